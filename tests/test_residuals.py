"""Client residual stores (fl_sim.clients.residuals): values, memory bound, sharing, snapshots, and the
disk store giving the same run as the context store."""

import csv
import os

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fl_sim.clients.residuals import ContextResidualStore, DiskResidualStore
from fl_sim.config import load_config
from fl_sim.rng import torch_generator
from fl_sim.runs.simulation import run_experiment


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def vec(d, *key):
    return torch.randn(d, generator=torch_generator("residual-test", *key))


@pytest.mark.parametrize("kind", ["context", "disk"])
def test_round_trip_fp32_exact_fp16_within_half_ulp(kind, tmp_path):
    d = 1000
    r = vec(d, 0) * 3.0
    stores = {}
    for dtype in ("float32", "float16"):
        if kind == "context":
            stores[dtype] = ContextResidualStore(context(), dtype)
        else:
            stores[dtype] = DiskResidualStore.create(tmp_path / dtype, dim=d, dtype=dtype)
        assert stores[dtype].load(7) is None
        stores[dtype].save(7, r)
    assert torch.equal(stores["float32"].load(7), r)
    back = stores["float16"].load(7)
    # Round to nearest in fp16: relative error <= 2^-11 (half the 2^-10 spacing) for normal numbers
    # (|r| >= 2^-14 here except a few tiny entries, whose absolute error is <= 2^-25, the subnormal half-step).
    err = (back - r).abs()
    assert bool((err <= torch.maximum(r.abs() * 2.0**-11, torch.full_like(r, 2.0**-25))).all())
    assert float(err.max()) > 0  # it really is stored in half precision


def test_disk_equals_context_bitwise(tmp_path):
    d = 300
    for dtype in ("float32", "float16"):
        ctx, disk = ContextResidualStore(context(), dtype), DiskResidualStore.create(tmp_path / dtype, d, dtype)
        for cid in (0, 5, 99):
            ctx.save(cid, vec(d, cid))
            disk.save(cid, vec(d, cid))
        for cid in (0, 5, 99):
            assert torch.equal(ctx.load(cid), disk.load(cid))
        assert disk.load(6) is None and ctx.load(6) is None


def test_budget_is_never_exceeded_and_values_stay_right(tmp_path):
    """200 clients, 30 rounds of 12 sampled: cached bytes <= budget after every operation."""
    d, dtype = 257, "float16"
    row = d * 2
    budget = int(5.5 * row)  # room for 5 rows
    store = DiskResidualStore.create(tmp_path / "s", d, dtype, budget_bytes=budget)
    truth: dict[int, torch.Tensor] = {}
    rng = np.random.default_rng(0)
    peak = 0
    for rnd in range(30):
        for cid in rng.choice(200, size=12, replace=False).tolist():
            got = store.load(cid)
            if cid in truth:
                assert torch.equal(got, truth[cid])
            else:
                assert got is None
            new = vec(d, rnd, cid)
            store.save(cid, new)
            truth[cid] = new.to(torch.float16).to(torch.float32)
            peak = max(peak, store.memory_bytes)
            assert store.memory_bytes <= budget
        for cid in rng.choice(sorted(truth), size=3, replace=False).tolist():  # re-reads: cache hits
            assert torch.equal(store.load(cid), truth[cid])
            assert store.memory_bytes <= budget
    assert peak == 5 * row and store.hits > 0 and len(store.present()) == len(truth)
    assert sorted(store.present().tolist()) == sorted(truth)


def test_zero_budget_holds_nothing(tmp_path):
    store = DiskResidualStore.create(tmp_path / "s", 64, "float32")
    for cid in range(50):
        store.save(cid, vec(64, cid))
        store.load(cid)
    assert store.memory_bytes == 0 and store.hits == 0


def test_rows_only_for_participants(tmp_path):
    """A store sized for 100,000 clients of d = 4096 float32 (1.6 GB) holds 3 rows on disk."""
    d = 4096
    store = DiskResidualStore.create(tmp_path / "s", d, "float32")
    for cid in (3, 50_000, 99_999):
        store.save(cid, vec(d, cid))
    assert store.present().tolist() == [3, 50_000, 99_999]
    assert (tmp_path / "s" / "rows.bin").stat().st_size == 100_000 * d * 4  # logical size
    assert store.disk_bytes() <= 3 * d * 4 + 3 * 65536  # allocated: the three rows (block-rounded)


def test_another_process_write_is_seen_through_the_cache(tmp_path):
    """Two handles on one directory (as two Ray workers): a stale cached row is never used."""
    d = 32
    a = DiskResidualStore.create(tmp_path / "s", d, "float32", budget_bytes=10 * d * 4)
    b = DiskResidualStore(tmp_path / "s", budget_bytes=10 * d * 4)
    a.save(1, vec(d, "first"))
    assert torch.equal(b.load(1), vec(d, "first"))
    b.save(1, vec(d, "second"))  # round t+1 on the other worker
    assert torch.equal(a.load(1), vec(d, "second"))
    assert a.hits == 0 and a.reads == 1


def test_snapshot_restore_keeps_exactly_the_snapshot(tmp_path):
    d = 50
    store = DiskResidualStore.create(tmp_path / "s", d, "float16", budget_bytes=4 * d * 2)
    for cid in (2, 4):
        store.save(cid, vec(d, cid))
    assert store.snapshot(tmp_path / "ids.npy", tmp_path / "rows") == 2
    store.save(4, vec(d, "later"))  # after the checkpoint: must be undone
    store.save(9, vec(d, "new"))  # first residual after the checkpoint: must be forgotten
    assert store.restore(tmp_path / "ids.npy", tmp_path / "rows") == 2
    fresh = DiskResidualStore(tmp_path / "s")
    for s in (store, fresh):
        assert s.present().tolist() == [2, 4]
        for cid in (2, 4):
            assert torch.equal(s.load(cid), vec(d, cid).half().float())
        assert s.load(9) is None


def test_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        DiskResidualStore(tmp_path / "none")
    store = DiskResidualStore.create(tmp_path / "s", 10, "float32")
    with pytest.raises(ValueError, match="d=10"):
        store.save(0, torch.zeros(11))
    with pytest.raises(ValueError, match="float32 or float16"):
        DiskResidualStore.create(tmp_path / "t", 10, "bfloat16")


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "round_s")} for r in csv.DictReader(f)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_topk_ef_run_disk_equals_context(dtype, tmp_path):
    """configs/topk_ef.yaml, 5 inline rounds: the two stores hold the same bytes, so the runs are identical."""
    sets = ["rounds=5", "clients=20", "clients_per_round=5", "model.hidden=[16]", "simulation.backend=inline",
            f"strategy.ef_dtype={dtype}"]
    ctx = load_config("configs/topk_ef.yaml", sets + ["simulation.residual_store=context", "checkpoint_every=0"])
    disk = load_config("configs/topk_ef.yaml", sets + ["simulation.residual_store=disk",
                                                       "simulation.residual_budget_mb=0.01"])
    run_experiment(ctx, tmp_path / "ctx")
    run_experiment(disk, tmp_path / "disk")
    a, b = _rows(tmp_path / "ctx"), _rows(tmp_path / "disk")
    assert len(a) == 6 and a == b


def test_disk_store_keeps_residuals_out_of_the_contexts(tmp_path):
    """Through the real ClientApp: residuals land in the store's rows, node contexts stay empty."""
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.runs.simulation import residual_store, server_loop
    from fl_sim.testing import InMemoryGrid

    cfg = load_config("configs/topk_ef.yaml", ["rounds=3", "clients=20", "clients_per_round=5",
                                               "model.hidden=[16]", "simulation.backend=inline"])
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    store = residual_store(cfg, exp, strategy, tmp_path)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    sampled: set[int] = set()
    server_loop(grid, exp, strategy, None, lambda rnd, row: sampled.update(strategy.sent) if rnd else None)
    assert set(store.present().tolist()) == sampled and len(sampled) >= 5
    assert all(len(ctx.state) == 0 for ctx in grid.contexts.values())
    assert all(float(store.load(c).abs().sum()) > 0 for c in sampled)  # top-k left something behind


def test_close_twice_never_closes_another_files_descriptor(tmp_path):
    """A closed store's __del__ (or a cache evicting a store its run closed) must not close the descriptor
    numbers again: POSIX hands the lowest free numbers to the next open, so a second close would close an
    unrelated file (seen as EBADF in `fl-sim compare`'s long-lived workers, or a pwrite into the wrong file)."""
    store = DiskResidualStore.create(tmp_path / "a", dim=8)
    old = {store._rows, store._tokens}
    store.close()
    other = os.open(tmp_path / "other.bin", os.O_RDWR | os.O_CREAT)
    try:
        assert other in old  # the freed number was reused, as POSIX promises
        store.close()
        store.__del__()
        os.fstat(other)  # still open: raises OSError(EBADF) if the store closed it again
        os.pwrite(other, b"ok", 0)
    finally:
        os.close(other)


def test_a_finished_run_releases_its_store_in_the_process(tmp_path):
    """After a run with client error feedback, the process keeps no handle on its (deleted) store."""
    from fl_sim.clients import residuals

    cfg = load_config("topk_ef", ["rounds=2", "clients=6", "clients_per_round=3", "eval_every=0",
                                  "simulation.backend=inline"])
    run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "state").exists()
    assert not [k for k in residuals._OPEN if str(tmp_path) in k[0]]
