"""fl_sim.wire.records: the faster readers and writers give exactly Flower's bytes and arrays."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fl_sim.wire.records import (ParsedArray, _fast_view, array_bits, flatten_arrays, flatten_with_bits, ndarray_to_array,
                            read_array, unflatten_into)
from fl_sim.testing import InMemoryGrid

SHAPES = [(200, 60), (200,), (10, 200), (10,), (3, 1, 5, 5)]


def record(seed=0, dtypes=("float32",)):
    rng = np.random.default_rng(seed)
    out = {f"a{i}": rng.standard_normal(s).astype(dtypes[i % len(dtypes)]) for i, s in enumerate(SHAPES)}
    out["steps"] = np.array([7], dtype=np.int64)  # an integer buffer: counted in bits, not in the flat vector
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def test_flatten_with_bits_is_flatten_and_array_bits():
    rec = record(1, ("float32", "float64"))
    vec, bits = flatten_with_bits(rec)
    assert np.array_equal(vec.numpy(), flatten_arrays(rec).numpy())
    assert bits == array_bits(rec)
    assert bits == 8 * sum(a.numpy().nbytes for a in rec.values())


def test_parsed_array_has_array_bytes_and_a_fresh_writable_numpy():
    nd = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    plain, parsed = Array(nd), ParsedArray(nd)
    assert (parsed.dtype, tuple(parsed.shape), parsed.stype, parsed.data) == \
        (plain.dtype, tuple(plain.shape), plain.stype, plain.data)
    a = parsed.numpy()
    assert np.array_equal(a, plain.numpy()) and a.flags.writeable
    a[0, 0] = 99.0  # the caller's copy: the record is unchanged
    assert np.array_equal(parsed.numpy(), nd)
    parsed.data = Array(nd * 2).data  # fields replaced: numpy() reads the new bytes
    assert np.array_equal(parsed.numpy(), nd * 2)


def test_fedavg_of_parsed_shared_model_equals_plain_bitwise():
    """The wrapper hands FedAvg one model K times: with ParsedArray its aggregate is the same, bit for bit."""
    tmpl = record(3)
    vec = flatten_arrays(tmpl) * 1.5
    grid = InMemoryGrid(ClientApp(), 4)  # sets Flower's task identity, so messages can be made
    def replies(parsed):
        one = unflatten_into(tmpl, vec, parsed=parsed)
        assert all(isinstance(x, ParsedArray) for x in one.values()) == parsed
        out = []
        for node, n in zip(grid.get_node_ids(), [3, 10, 7, 1]):
            sent = grid.create_message(RecordDict(), "train", node, "")
            out.append(Message(RecordDict({"arrays": one, "metrics": MetricRecord({"num-examples": n})}),
                               reply_to=sent))
        return out
    got = {}
    for parsed in (False, True):
        msgs = replies(parsed)
        arrays, _ = FedAvg().aggregate_train(1, msgs)
        got[parsed] = {k: v.numpy() for k, v in arrays.items()}
    for k in got[False]:
        assert got[True][k].dtype == got[False][k].dtype and np.array_equal(got[True][k], got[False][k]), k


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "float64"])
def test_read_array_fast_path_equals_flowers_numpy(dtype):
    for shape in [(5,), (2, 3), (1, 1, 4, 4), (0,)]:
        nd = (np.arange(int(np.prod(shape))) - 3).reshape(shape).astype(dtype)
        for arr in (Array(nd), ndarray_to_array(nd)):
            assert _fast_view(arr) is not None  # Flower's and our bytes take the in-place read
            got = read_array(arr)
            assert got.dtype == nd.dtype and got.shape == nd.shape and np.array_equal(got, arr.numpy())
