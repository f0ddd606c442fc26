"""Batched client-side encoding: Codec.encode_batch / decode_batch, residual blocks, the grid path.

Every override must give ``encode_seeded``'s payloads bitwise (same tensors, dtypes, bits, meta) row by row,
and decode_batch ``decode_seeded``'s vectors; the vectorized grid's block encoding must give the replies the
per-reply ``compression_mod`` gives, bit for bit, and the inline backend's bits and losses.
"""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fl_sim.clients import cohort_encode
from fl_sim.clients.app import make_client_app
from fl_sim.clients.mods import compression_mod
from fl_sim.clients.residuals import ContextResidualStore, DiskResidualStore
from fl_sim.compression import make_codec
from fl_sim.compression.base import Seeds
from fl_sim.compression.segments import RowSegments, Segments
from fl_sim.config import load_config
from fl_sim.testing import run_in_memory

SEGS = [3000, 200, 1000, 10]  # d = 4210, four tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (floats compared bit for bit: -0.0 differs from 0.0, NaN payloads count)."""
    return t.contiguous().view(-1).view(torch.uint8) if t.dtype.is_floating_point else t


def assert_same_payload(a, b):
    assert (a.codec, a.dim, a.bits, a.meta) == (b.codec, b.dim, b.bits, b.meta)
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        x, y = a.tensors[k], b.tensors[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(_bits(x), _bits(y)), k


def _block(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(5, d, generator=g) * torch.rand(5, d, generator=g) ** 3
    Z[1, :100] = 0.0  # exact zeros and ties
    Z[2] = Z[2].round()  # many ties at the top-k boundary
    Z[3] *= 1e-33  # a row scaled inside the codecs (QCS, RLC)
    Z[4] = 0.0  # a zero update
    return Z


CODECS = [
    ("topk", dict(k=42)),
    ("topk", dict(k=42, granularity="tensor", segments=SEGS, index_coding="elias")),
    ("qsgd", dict(levels=4, segments=SEGS)),
    ("qsgd", dict(levels=4, granularity="vector", coding="fixed")),
    ("qsgd", dict(levels=3, bucket=128, segments=SEGS)),
    ("sign", dict(segments=SEGS)),
    ("sign", dict(granularity="vector")),
    ("terngrad", dict(segments=SEGS)),
    ("terngrad", dict(clip_sigma=None, granularity="vector")),
    ("qcs", dict(block=256, k=128, levels=4)),
    ("qcs", dict(block=256, k=110, levels=2, segments=SEGS, alpha="mmse")),
    ("qcs", dict(block=64, k=1, levels=0.5)),
    ("qcs", dict(block=128, k=32, levels=0.5, granularity="vector")),
    ("count_sketch", dict(rows=5, cols=284, k=142)),
    ("cs_fiht", dict(measurements=421)),
    ("cs_fiht", dict(measurements=421, transform="wht")),
    ("rlc", dict(m=210)),
    ("randk", dict(k=42)),  # the default loop
    ("onebit_cs", dict(measurements=1000, block=256)),  # the default loop ("mixed" seeds)
]


@pytest.mark.parametrize("name,params", CODECS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CODECS)])
@pytest.mark.parametrize("d", [4210, 1001])
def test_encode_batch_is_encode_seeded_bitwise(name, params, d):
    if "segments" in params and d != sum(SEGS):
        params = {**params, "segments": [d - 11, 11]}
    codec = make_codec(name, dim=d, **params)
    Z = _block(d)
    seeds = [Seeds(7, c) for c in (3, 1, 9, 2, 5)]
    batch = codec.encode_batch(Z, seeds)
    for i, s in enumerate(seeds):
        assert_same_payload(batch[i], codec.encode_seeded(Z[i].clone(), s))
    if name in ("cs_fiht", "onebit_cs"):
        return  # decode_batch is the default loop of decode_seeded (one recovery per payload)
    decoded = codec.decode_batch(batch, seeds, validate=False)
    payloads, both = codec.roundtrip_batch(Z, seeds)
    for i, s in enumerate(seeds):
        assert torch.equal(_bits(decoded[i]), _bits(codec.decode_seeded(batch[i], s)))
        assert_same_payload(payloads[i], batch[i])
        assert torch.equal(_bits(both[i]), _bits(decoded[i]))


def test_encode_batch_checks_its_input():
    codec = make_codec("topk", dim=10, k=2)
    with pytest.raises(ValueError, match=r"\(C, 10\)"):
        codec.encode_batch(torch.zeros(3, 9), [Seeds(0, i) for i in range(3)])
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_batch(torch.full((2, 10), float("nan")), [Seeds(0, i) for i in range(2)])
    with pytest.raises(ValueError, match="2 rows but 1 seeds"):
        codec.encode_batch(torch.zeros(2, 10), [Seeds(0, 0)])
    assert codec.encode_batch(torch.zeros(0, 10), []) == []


def test_common_codecs_with_different_round_seeds_fall_back_to_the_loop():
    codec = make_codec("count_sketch", dim=300, rows=3, cols=40, k=10)
    Z, seeds = _block(300), [Seeds(s, None) for s in (1, 2, 1, 3, 1)]
    for p, z, s in zip(codec.encode_batch(Z, seeds), Z, seeds):
        assert_same_payload(p, codec.encode_seeded(z.clone(), s))


def test_row_segments_sum_each_row_as_a_lone_vector():
    """torch sums a lone vector of d >= 32,768 in another order than the rows of a block: RowSegments does not."""
    x = torch.randn(3, 50_000, dtype=torch.float64) * torch.rand(3, 50_000, dtype=torch.float64) ** 5
    seg = Segments.whole(50_000)
    rows = RowSegments(seg).sum(x)
    for i in range(3):
        assert torch.equal(rows[i], seg.sum(x[i].clone()))


# ---------------------------------------------------------------------------------------------- residual stores
def _residual_block(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("budget", [0, 10**6])
def test_disk_store_blocks_equal_per_row_calls(tmp_path, dtype, budget):
    d = 37
    ids = [5, 6, 7, 2, 40, 0, 9]  # runs of consecutive ids, unsorted, a gap
    R = _residual_block(len(ids), d)
    block = DiskResidualStore.create(tmp_path / "a", dim=d, dtype=dtype, budget_bytes=budget)
    single = DiskResidualStore.create(tmp_path / "b", dim=d, dtype=dtype, budget_bytes=budget)
    assert block.load_many(ids) == [None] * len(ids)
    block.save_many(ids, R)
    for cid, r in zip(ids, R):
        single.save(cid, r)
    asked = [0, 1, 2, 40, 41, 7, 100]  # present, never written, past the end of the files
    for a, b in zip(block.load_many(asked), [single.load(c) for c in asked]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (block.hits, block.reads) == (single.hits, single.reads)
    assert np.array_equal(block.present(), single.present())
    assert block.memory_bytes == single.memory_bytes <= budget
    # a write by another process (a fresh token) is seen: the cache never serves a stale row
    other = DiskResidualStore(tmp_path / "a")
    other.save(7, torch.ones(d))
    assert torch.equal(block.load_many([7])[0], torch.ones(d))
    with pytest.raises(ValueError, match="twice"):
        block.save_many([1, 1], _residual_block(2, d))
    with pytest.raises(ValueError, match="d=37"):
        block.save_many([1], torch.zeros(1, 5))
    for s in (block, single, other):
        s.close()


def test_context_store_blocks_equal_per_row_calls():
    ctx_a, ctx_b = (Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}) for _ in range(2))
    a, b = ContextResidualStore(ctx_a, "float16"), ContextResidualStore(ctx_b, "float16")
    R = _residual_block(3, 11)
    a.save_many([4, 1, 8], R)
    for cid, r in zip([4, 1, 8], R):
        b.save(cid, r)
    for x, y in zip(a.load_many([1, 2, 8, 4]), [b.load(c) for c in [1, 2, 8, 4]]):
        assert (x is None and y is None) or torch.equal(x, y)


# ---------------------------------------------------------------------------------------------- the grid path
SETS = ["rounds=2", "clients=12", "clients_per_round=4", "data.name=synthetic", "data.partition=natural",
        "model.name=mlp", "model.hidden=[16]", "eval_every=1"]


def _rows(config, backend, monkeypatch=None, batched=True, extra=()):
    import fl_sim.engine.vectorized as fv

    encoded = []
    send = fv.VectorizedGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        out = list(send(self, messages, timeout=timeout))
        encoded.append(self.last_encoded)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fv.VectorizedGrid, "send_and_receive", recording)
        if not batched:
            mp.setattr(fv.cohort_encode, "applies", lambda app: False)
        _, rows, _ = run_in_memory(load_config(config, SETS + [f"simulation.backend={backend}", *extra]))
    return rows, sum(encoded)


@pytest.mark.parametrize("config", ["topk_ef", "qcs", "cs_ef", "fiht_cs", "qsgd", "sign"])
def test_block_encoding_gives_the_per_reply_and_inline_numbers(config):
    inline, _ = _rows(config, "inline")
    per_reply, none = _rows(config, "vectorized", batched=False)
    batched, encoded = _rows(config, "vectorized")
    assert none == 0 and encoded == 2 * 4  # every train reply of both rounds was encoded as a block
    for a, b, c in zip(inline, per_reply, batched):
        assert b["uplink_bits"] == c["uplink_bits"] and b["test_loss"] == c["test_loss"]  # the same computation
        assert a["uplink_bits"] == c["uplink_bits"]
        assert a["test_loss"] == pytest.approx(c["test_loss"], rel=2e-4)  # training's float32 rounding (test_vectorized)


def test_block_encoding_with_the_disk_residual_store(tmp_path):
    """run_experiment keeps client residuals in the run's disk store: read and written as blocks, same run."""
    import csv

    from fl_sim.clients.residuals import DiskResidualStore
    from fl_sim.runs.simulation import run_experiment

    import fl_sim.engine.vectorized as fv

    def run(out, batched):
        calls = []
        load_many = DiskResidualStore.load_many
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DiskResidualStore, "load_many", lambda self, cids: calls.append(len(cids)) or load_many(self, cids))
            if not batched:
                mp.setattr(fv.cohort_encode, "applies", lambda app: False)
            run_experiment(load_config("topk_ef", SETS + ["rounds=3", "simulation.backend=vectorized"]), out)
        with open(out / "metrics.csv") as f:
            rows = [{k: r[k] for k in ("round", "train_loss", "test_loss", "uplink_bits")} for r in csv.DictReader(f)]
        return rows, calls

    (a, calls), (b, none) = run(tmp_path / "a", True), run(tmp_path / "b", False)
    assert calls == [4, 4, 4] and none == []  # one block read a round (4 clients, one chunk)
    assert len(a) == 4 and a == b


def test_user_mods_keep_the_per_reply_path():
    cfg = load_config("topk_ef", SETS)
    assert cohort_encode.applies(make_client_app(cfg))
    assert not cohort_encode.applies(make_client_app(cfg, mods=[compression_mod, lambda m, c, n: n(m, c)]))
    assert not cohort_encode.applies(make_client_app(cfg, mods=[]))
