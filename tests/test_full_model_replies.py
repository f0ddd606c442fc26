"""Full-model replies hold exactly the global model's arrays: names, shapes and dtypes checked, extras refused.

One round of FedAvg on the in-memory grid (real ClientApp); one reply is altered. Before these checks a
reply was only flattened: extra integer arrays were accepted and their bytes counted as uplink (a 10 MB
int8 array raised a round's count 36x), a transposed or float64 array of the right size passed, and a
reply listing its arrays in another order was silently misaligned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fl_sim.wire import keys
from fl_sim.wire.records import flatten_arrays
from test_reply_checks import K, cfg_for, round_one, server_part


def one_round(tamper=None, caplog=None):
    """(aggregated model vector, server metrics, the altered reply's node) of round 1 with ``tamper``
    applied to the first reply."""
    s, _, replies = round_one(cfg_for({"name": "fedavg"}))
    node = replies[0].metadata.src_node_id
    if tamper is not None:
        arrays = replies[0].content[keys.ARRAYS]
        replies[0].content[keys.ARRAYS] = tamper(ArrayRecord({k: Array(a.numpy()) for k, a in arrays.items()}))
    arrays, metrics = s.aggregate_train(1, replies)
    return flatten_arrays(arrays), server_part(metrics), node


def with_extra(record):
    record["extra"] = Array(np.ones(1_000_000, dtype=np.int8))
    return record


def renamed(record):
    name = next(iter(record.keys()))
    record["renamed"] = record[name]
    del record[name]
    return record


def first_2d(record):
    return next(k for k, a in record.items() if len(a.shape) == 2 and a.shape[0] != a.shape[1])


def transposed(record):
    name = first_2d(record)
    record[name] = Array(np.ascontiguousarray(record[name].numpy().T))
    return record


def float64(record):
    name = next(iter(record.keys()))
    record[name] = Array(record[name].numpy().astype(np.float64))
    return record


def dropped(record):
    del record[next(iter(record.keys()))]
    return record


BAD = {
    "extra int8 array": (with_extra, "the global model lacks: ['extra']"),
    "renamed array": (renamed, "the global model lacks: ['renamed']"),
    "transposed array": (transposed, "the global model's is float32"),
    "float64 array": (float64, "is float64"),
    "missing array": (dropped, "lacks the arrays"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_reply_unlike_the_global_model_is_rejected(case, caplog):
    tamper, reason = BAD[case]
    honest_vec, honest, _ = one_round()
    with caplog.at_level("ERROR", logger="fl_sim"):
        vec, metrics, node = one_round(tamper)
    assert metrics["clients_rejected"] == 1 and metrics["clients_ok"] == K - 1
    assert metrics["uplink_bits"] == honest["uplink_bits"] * (K - 1) // K  # the extra bytes are not counted
    assert any(f"node {node}" in r.getMessage() and reason in r.getMessage() for r in caplog.records), caplog.text
    assert torch.isfinite(vec).all()


def test_arrays_in_another_order_read_by_name():
    """A reply listing the same arrays in another order is the same model (flattened in the global model's order)."""
    honest_vec, honest, _ = one_round()
    vec, metrics, _ = one_round(lambda r: ArrayRecord({k: r[k] for k in reversed(list(r.keys()))}))
    assert metrics["clients_rejected"] == 0 and metrics["uplink_bits"] == honest["uplink_bits"]
    torch.testing.assert_close(vec, honest_vec, rtol=0, atol=0)
