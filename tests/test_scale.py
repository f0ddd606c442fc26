"""Scale and benchmark plumbing: process-tree memory, the plain FedAvg reference, fabricated data, scale configs.

Small and fast: the benchmarks themselves (minutes, Ray) are ``fl-sim bench ...`` (fl_sim/bench) and
docs/performance.md; each has a smoke test in test_bench_smoke.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_sim.bench.bench_scale import TreeMemory, tree_memory, tree_pids
from fl_sim.bench.plain_loop import fabricate_cifar10, fabricate_mnist, plain_fedavg
from fl_sim.config import DataConfig, config_from_dict, load_config
from fl_sim.data import load_federated
from fl_sim.models import build_model

MIB = 1024**2


def test_tree_memory_counts_a_child_process():
    """A child holding 200 MiB of touched memory shows up in the tree's RSS and PSS (to within 40 MiB)."""
    code = "import sys, time; b = b'x' * (200 << 20); sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)"
    before_rss, before_pss, _, _ = tree_memory()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in tree_pids()
        rss, pss, per, cpu = tree_memory()
        # 200 MiB of private pages in the child; the interpreter itself adds ~10 MiB, other noise is small
        assert 180 * MIB < rss - before_rss < 260 * MIB
        assert 180 * MIB < pss - before_pss < 260 * MIB
        assert cpu > 0
        with TreeMemory(0.05) as mem:
            time.sleep(0.3)
            mark = mem.mark("m")
        assert mem.peak_rss >= mark["rss"] > before_rss + 180 * MIB
        assert len(mem.series) >= 3
    finally:
        child.kill()
        child.wait()
    assert child.pid not in tree_pids()


def test_tree_memory_rejects_bad_interval():
    with pytest.raises(ValueError, match="interval"):
        TreeMemory(0)


def test_fabricated_mnist_and_cifar_load_with_the_real_loaders(tmp_path):
    fabricate_mnist(tmp_path / "m", 600, 100, size=12)
    fd = load_federated(DataConfig(name="mnist", root=str(tmp_path / "m"), partition="iid"), 6, 0)
    assert fd.input_shape == (1, 12, 12) and fd.client_sizes.sum() == 600 and len(fd.test_data()[1]) == 100
    fabricate_cifar10(tmp_path / "c", 500, 50)
    fc = load_federated(DataConfig(name="cifar10", root=str(tmp_path / "c"), partition="iid"), 5, 0)
    assert fc.input_shape == (3, 32, 32) and fc.client_sizes.sum() == 500 and len(fc.test_data()[1]) == 50
    # the label is in the image (class template + noise): a nearest-template rule recovers it
    x, y = fc.source.x.reshape(500, -1), fc.source.y
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    assert (torch.cdist(x, means).argmin(1) == y).float().mean() > 0.95


def test_plain_loop_is_the_same_computation_as_fl_sim_fedavg(tmp_path):
    """Same clients, sampling, local steps and weighted average: the same final model (float32 rounding)."""
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.wire.records import flatten_arrays
    from fl_sim.runs.simulation import server_loop
    from fl_sim.testing import InMemoryGrid

    logging.disable(logging.INFO)
    try:
        cfg = config_from_dict({
            "seed": 3, "rounds": 2, "clients": 12, "clients_per_round": 4, "eval_every": 0,
            "data": {"name": "synthetic", "partition": "natural"},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
            "simulation": {"backend": "inline"},
        })
        plain = plain_fedavg(cfg)
        exp = build_experiment(cfg)
        rows: list[dict] = []
        result = server_loop(InMemoryGrid(make_client_app(cfg), cfg.clients), exp, build_strategy(exp), None,
                             lambda r, row: rows.append(dict(row)))
    finally:
        logging.disable(logging.NOTSET)
    fl_sim_final = flatten_arrays(result.arrays)
    plain_final = torch.cat([v.reshape(-1) for v in plain["state"].values()])
    init = flatten_arrays(exp.initial_arrays)
    # fl-sim adds the weighted mean update to w in float32; the loop averages models in float64:
    # the difference is float32 rounding of O(0.1) weights over 2 rounds (~1e-8), far below 1e-6.
    assert (fl_sim_final - plain_final).abs().max() < 1e-6
    assert (plain_final - init).abs().max() > 1e-3  # and the rounds did move the model
    assert rows[-1]["test_loss"] == pytest.approx(plain["rows"][-1]["test_loss"], rel=1e-5)


def test_scale_configs_have_tang_setting_2_shape():
    from fl_sim.strategies.fihtcs import TANG_SPARSITY_RATIO

    for path in ("configs/scale_10k.yaml", "configs/scale_10k_fetchsgd.yaml"):
        cfg = load_config(path)
        assert cfg.clients == 10_000 and cfg.sampled_per_round() == 100  # 1% participation
        assert cfg.data.partition == "shards" and cfg.data.shards_per_client == 2
        assert cfg.simulation.backend == "ray"
    fiht = load_config("configs/scale_10k.yaml")
    assert fiht.strategy.name == "fiht_cs" and fiht.strategy.options["compression"] == 10
    fetch = load_config("configs/scale_10k_fetchsgd.yaml")
    d = sum(p.numel() for p in build_model("cifarnet", (3, 32, 32), 10).parameters())
    o = fetch.strategy.options
    assert fetch.strategy.name == "fetchsgd"
    assert o["rows"] * o["cols"] == pytest.approx(d / 10, rel=1e-3)  # ~10x fewer values, as FIHT's d/Q
    assert o["k"] / d == pytest.approx(TANG_SPARSITY_RATIO, rel=1e-3)


def test_a_hundred_thousand_clients_cost_their_index_lists_only(tmp_path):
    """100,000 clients: one shared array, one int64 index list per client, nothing else per client."""
    fabricate_mnist(tmp_path, 100_000, 10, size=8)
    t0 = time.perf_counter()
    fd = load_federated(DataConfig(name="mnist", root=str(tmp_path), partition="iid"), 100_000, 0)
    assert time.perf_counter() - t0 < 20  # about 1 s here; seconds, not minutes, on a loaded machine
    assert len(fd.parts) == 100_000 and sum(p.nbytes for p in fd.parts) == 8 * 100_000
    assert all(p.dtype == np.int64 for p in fd.parts[:100])
    x, y = fd.client_data(99_999)
    assert torch.equal(x, fd.source.x[torch.from_numpy(fd.parts[99_999])])
    assert x.shape == (1, 1, 8, 8) and y.shape == (1,)


def test_memory_flat_benchmark_records_every_round(tmp_path, monkeypatch):
    """bench_memory_flat's measurement: one row per round 0..R with the tree's memory, peaks non-decreasing."""
    from fl_sim.bench.bench_memory_flat import measure, report

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    res = measure("inline", rounds=4, clients=20, per_round=4, sets=[])
    rows = res["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["rss"] > 100 * MIB and 0 < r["pss"] <= r["rss"] for r in rows)  # torch alone is > 100 MiB
    assert all(a["peak_rss"] <= b["peak_rss"] for a, b in zip(rows, rows[1:]))
    assert all(r["peak_rss"] >= r["rss"] for r in rows)
    lines = report(res)
    assert "round    4" in lines[-1] and "inline" in lines[0]


def test_client_runtime_lookup_keeps_nothing_per_message():
    """Ray ships a new copy of the config with every message: the same runtime, and no entry per copy."""
    import pickle

    from fl_sim.clients import runtime as crt

    cfg = config_from_dict({"seed": 5, "clients": 8, "clients_per_round": 2, "data": {"name": "synthetic", "partition": "natural"},
                            "model": {"name": "mlp", "hidden": [8]}})
    rt = crt.runtime_for(cfg)
    assert crt.runtime_for(cfg) is rt
    for _ in range(50):
        assert crt.runtime_for(pickle.loads(pickle.dumps(cfg))) is rt
    assert len(crt._RECENT) <= crt._RECENT_MAX
    other = config_from_dict({"seed": 6, "clients": 8, "clients_per_round": 2, "data": {"name": "synthetic", "partition": "natural"},
                              "model": {"name": "mlp", "hidden": [8]}})
    assert crt.runtime_for(other) is not rt and crt.runtime_for(pickle.loads(pickle.dumps(cfg))) is rt
