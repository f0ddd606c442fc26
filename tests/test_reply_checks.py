"""One client must never abort a run or poison the model.

Each test sends one bad reply through a real strategy on the in-memory grid (real ClientApp and mods)
and checks that the round completes, the reply is rejected or bounded, logged with its node, and
counted. On the code before these checks each case either raised out of ``aggregate_train`` (the
run aborted) or let the reply through (model poisoned, claimed bits recorded).
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.wire import keys
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.clients import compression_mod
from fl_sim.clients.app import make_client_app
from fl_sim.compression import PayloadError
from fl_sim.config import config_from_dict
from fl_sim.wire.records import flatten_arrays, read_array
from fl_sim.runs.simulation import server_loop
from fl_sim.strategies import FedAvgBaseline, guards
from fl_sim.strategies.base import SERVER_PREFIX
from fl_sim.testing import InMemoryGrid

K = 4


def cfg_for(strategy: dict, codec: dict | None = None, **over):
    raw = {
        "rounds": 2, "clients": 8, "clients_per_round": K,
        "data": {"name": "synthetic", "partition": "natural"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"lr": 0.05, "batch_size": 16},
        "strategy": strategy,
    }
    if codec:
        raw["codec"] = codec
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


def run_tampered(cfg, tamper, caplog):
    """Run cfg in memory with ``tamper(reply, index)`` applied to the first reply of every round."""
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    seen = {"n": 0, "nodes": []}

    def hook(reply):
        rnd = int(seen["n"] // K)
        first = seen["n"] % K == 0
        seen["n"] += 1
        if first and not reply.has_error():
            seen["nodes"].append(reply.metadata.src_node_id)
            return tamper(reply, rnd)
        return reply

    grid.tamper = hook
    rows = []
    with caplog.at_level("WARNING", logger="fl_sim"):
        server_loop(grid, exp, strategy, None, lambda r, row: rows.append(dict(row)))
    return rows, strategy, seen["nodes"]


def big_header_array() -> Array:
    """An npy array whose header declares 2^40 float32 values but which carries 16 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    return Array(dtype="float32", shape=(2**40,), stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 16)


def test_read_array_checks_the_declared_size_before_allocating():
    with pytest.raises(PayloadError, match="declares shape"):
        read_array(big_header_array(), "x")
    ok = Array(np.arange(5, dtype=np.float32))
    assert read_array(ok).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(PayloadError, match="not a valid npy"):
        read_array(Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"garbage!"))


def set_metric(key, value):
    def tamper(reply, rnd):
        reply.content[keys.METRICS][key] = value
        return reply
    return tamper


def set_array(make):
    def tamper(reply, rnd):
        arrays = reply.content[keys.ARRAYS]
        name = next(iter(arrays.keys()))
        arrays[name] = make(arrays[name])
        return reply
    return tamper


BAD_REPLIES = {
    "num-examples inf": (set_metric(keys.NUM_EXAMPLES, float("inf")), "num-examples"),
    "num-examples nan": (set_metric(keys.NUM_EXAMPLES, float("nan")), "num-examples"),
    "num-examples fractional": (set_metric(keys.NUM_EXAMPLES, 2.5), "whole number"),
    "cid inf": (set_metric(keys.M_CID, float("inf")), "cid"),
    "cid nan": (set_metric(keys.M_CID, float("nan")), "cid"),
    "cid of another node": (set_metric(keys.M_CID, 10**6), "was not sent"),
    "train-loss list": (set_metric(keys.TRAIN_LOSS, [1.0, 2.0]), "train-loss"),
    "npy header of 2^40 values": (set_array(lambda a: big_header_array()), "declares shape"),
}


@pytest.mark.parametrize("strategy,codec", [({"name": "fedavg"}, None),
                                            ({"name": "compressed"}, {"name": "topk", "k": 20})])
@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_bad_reply_rejected_round_goes_on(case, strategy, codec, caplog):
    tamper, reason = BAD_REPLIES[case]
    rows, strat, nodes = run_tampered(cfg_for(strategy, codec), tamper, caplog)
    assert len(rows) == 3
    for row in rows[1:]:
        assert row["clients_failed"] == 1 and row["clients_rejected"] == 1 and row["clients_ok"] == K - 1
        assert math.isfinite(row["test_accuracy"])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    for node in nodes:
        assert any(f"node {node}" in m and reason in m for m in errors), (node, reason, errors)


def test_rlc_client_id_out_of_range_rejected(caplog):
    """RLC reads α_i = n_i/n from its client-size table by the reply's client id."""
    cfg = cfg_for({"name": "rlc", "gain": 4}, channel={"snr_db": 20.0, "fading": "none"})
    rows, _, nodes = run_tampered(cfg, set_metric(keys.M_CID, 10**9), caplog)
    assert all(r["clients_rejected"] == 1 for r in rows[1:])


def round_one(cfg):
    """(strategy, grid, the honest replies of round 1) of ``cfg`` on the in-memory grid (real ClientApp)."""
    exp = build_experiment(cfg)
    s = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    msgs = list(s.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    return s, grid, list(grid.send_and_receive(msgs))


def test_duplicate_client_id_rejected(caplog):
    s, _, replies = round_one(cfg_for({"name": "fedavg"}))
    replies.append(replies[0])
    with caplog.at_level("ERROR", logger="fl_sim"):
        _, metrics = s.aggregate_train(1, replies)
        metrics = server_part(metrics)
    assert metrics["clients_ok"] == K and metrics["clients_rejected"] == 1
    assert any("second reply" in r.getMessage() for r in caplog.records)


def daqusgd_cfg():
    return cfg_for({"name": "daqusgd", "bits_per_feature": 3, "epoch_rounds": 1})


@pytest.mark.parametrize("case", ["width", "levels", "loss-sum text"])
def test_daqusgd_value_checks(case, caplog):
    def tamper(reply, rnd):
        arrays = reply.content[keys.ARRAYS]
        lv = arrays["levels"].numpy()  # packed 3-bit codes (fl_sim.wire.daqusgd)
        if case == "width":
            arrays["levels"] = Array(np.concatenate([lv, np.zeros(3, np.uint8)]))
        elif case == "levels":  # code 7 (bits 111) is outside the 7 values -3..3
            arrays["levels"] = Array(np.full(lv.shape, 0xFF, np.uint8))
        else:
            reply.content[keys.METRICS]["sent-loss-sum"] = [1.0]
        return reply

    rows, _, nodes = run_tampered(daqusgd_cfg(), tamper, caplog)
    assert all(r["clients_rejected"] == 1 for r in rows[1:])
    assert all(math.isfinite(r["test_accuracy"]) for r in rows)


def test_daqusgd_huge_sent_loss_does_not_stop_sending(caplog):
    """sent-loss-sum = 1e30 once made the next threshold 0.2 x 1e30 / n: no node sent again."""
    rows, s, _ = run_tampered(daqusgd_cfg(), set_metric("sent-loss-sum", 1e30), caplog)
    assert all(r["clients_rejected"] == 1 for r in rows[1:])
    assert s.threshold < 100.0 and rows[2]["received_samples"] > 0


# ---------------------------------------------------------------- guards, toy client: w + (cid+1)
D = 7


def toy_app():
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def _train(msg: Message, ctx):
        cid = int(msg.content[keys.CONFIG][keys.CID])
        out = ArrayRecord({k: Array(a.numpy() + (cid + 1.0)) for k, a in msg.content[keys.ARRAYS].items()})
        metrics = MetricRecord({keys.NUM_EXAMPLES: cid + 1, keys.TRAIN_LOSS: 0.5, keys.M_CID: cid})
        return Message(RecordDict({keys.ARRAYS: out, keys.METRICS: metrics}), reply_to=msg)

    return app


def initial():
    return ArrayRecord({"w": Array(np.zeros((3,), np.float32)), "b": Array(np.zeros((4,), np.float32))})


def server_part(metrics):
    """fl-sim's server figures of a returned MetricRecord (the wrapper names them ``server.<name>``)."""
    return {k[len(SERVER_PREFIX):]: v for k, v in metrics.items() if k.startswith(SERVER_PREFIX)}


def toy_round(strategy, tamper):
    grid = InMemoryGrid(toy_app(), 5)

    def bad(reply):
        return tamper(reply) if int(reply.content[keys.METRICS][keys.M_CID]) == 2 else reply

    grid.tamper = bad
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    return arrays, server_part(metrics)


def huge_update(reply):
    reply.content[keys.ARRAYS] = ArrayRecord({"w": Array(np.full(3, 3e38, np.float32)),
                                              "b": Array(np.full(4, 3e38, np.float32))})
    return reply


def test_extreme_update_is_clipped_to_the_norm_bound(caplog):
    """Client 2 sends 3e38 per coordinate; honest updates are (c+1) per coordinate, n_c = c + 1.

    Norms (÷√7): 1, 2, 4, 5 and 3e38; lower median 4, so client 2 is clipped to 40 per coordinate and
    Δ̄ = (1·1 + 2·2 + 3·40 + 4·4 + 5·5) / 15 per coordinate."""
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0, guards={"norm_mode": "clip"})
    with caplog.at_level("WARNING", logger="fl_sim"):
        arrays, metrics = toy_round(s, huge_update)
    got = flatten_arrays(arrays)
    assert torch.allclose(got, torch.full((D,), 166 / 15), rtol=1e-5)
    assert metrics["replies_clipped"] == 1 and metrics["clients_ok"] == 5
    assert any("clipped" in r.getMessage() and "client 2" in r.getMessage() for r in caplog.records)


def test_extreme_update_rejected_by_default():
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0)
    arrays, metrics = toy_round(s, huge_update)
    n = np.array([1.0, 2.0, 4.0, 5.0])
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), float((n * n).sum() / n.sum())), rtol=1e-5)
    assert metrics["clients_rejected"] == 1 and metrics["clients_failed"] == 1


def test_guards_off_restores_plain_fedavg():
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0,
                       guards={"norm_bound": None, "weight_cap": None, "scalar_bound": None})
    arrays, metrics = toy_round(s, lambda r: r)
    n = np.arange(1.0, 6.0)
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), float((n * n).sum() / n.sum())), rtol=1e-6)
    assert metrics["replies_clipped"] == 0 and metrics["weights_capped"] == 0


def liar(reply):
    reply.content[keys.METRICS][keys.NUM_EXAMPLES] = 1e18
    return reply


def test_num_examples_is_capped_relative_to_the_round():
    """n_2 = 1e18 is capped at weight_cap x the lower median of (1, 2, 4, 5, 1e18) = 10 x 4."""
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0, guards={"weight_cap": 10})
    arrays, metrics = toy_round(s, liar)
    n = np.array([1.0, 2.0, 40.0, 4.0, 5.0])
    upd = np.arange(1.0, 6.0)
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), float((n * upd).sum() / n.sum())), rtol=1e-5)
    assert metrics["weights_capped"] == 1


def test_num_examples_is_capped_at_the_known_client_size():
    """A simulation's server knows n_c (guards.client_sizes): client 2 (true size 3) is weighed 3."""
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0, guards={"client_sizes": [1, 2, 3, 4, 5]})
    arrays, metrics = toy_round(s, liar)
    n = np.arange(1.0, 6.0)
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), float((n * n).sum() / n.sum())), rtol=1e-6)
    assert metrics["weights_capped"] == 1



@pytest.mark.parametrize("guard", [{"client_sizes": [1, 2, 3, 4, 5]}, {"weight_cap": 10}])
def test_capped_weight_reaches_an_inner_that_weighs_by_the_metric(guard):
    """Under the wrapper an inner other than plain FedAvg gets one model per client and weighs them by the
    MetricRecord's num-examples (FedProx with mu = 0 is FedAvg's weighted mean): the cap must be written
    there too, or client 2's 1e18 makes it the whole aggregate (w = 3 per coordinate)."""
    from flwr.serverapp.strategy import FedProx

    s = FedAvgBaseline(FedProx(proximal_mu=0.0, min_available_nodes=1), clients_per_round=5, client_ids=range(5),
                       seed=0, guards=guard)
    arrays, metrics = toy_round(s, liar)
    n = np.array([1.0, 2.0, 3.0 if "client_sizes" in guard else 40.0, 4.0, 5.0])
    upd = np.arange(1.0, 6.0)
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), float((n * upd).sum() / n.sum())), rtol=1e-5)
    assert metrics["weights_capped"] == 1

def test_built_strategies_know_the_client_sizes(caplog):
    cfg = cfg_for({"name": "fedavg"})
    rows, s, _ = run_tampered(cfg, set_metric(keys.NUM_EXAMPLES, 1e18), caplog)
    exp = build_experiment(cfg)
    assert s.guards["client_sizes"].tolist() == exp.data.client_sizes.tolist()
    assert all(r["weights_capped"] == 1 for r in rows[1:])
    capped = [r.getMessage() for r in caplog.records if "capped the num-examples" in r.getMessage()]
    assert len(capped) == 2
    for m in capped:  # "... client C (node N) from 1e+18 to n_C"
        cid = int(re.search(r"client (\d+)", m).group(1))
        assert m.endswith(f"from 1e+18 to {float(exp.data.client_sizes[cid]):.3g}"), m


def test_guard_options_validated_and_reach_the_config():
    with pytest.raises(ValueError, match="unknown option"):
        FedAvgBaseline(guards={"norm_bund": 3})
    with pytest.raises(ValueError, match="norm_mode"):
        FedAvgBaseline(guards={"norm_mode": "drop"})
    with pytest.raises(ValueError, match=">= 1"):
        FedAvgBaseline(guards={"norm_bound": 0.5})
    with pytest.raises(ValueError, match="client_sizes"):
        FedAvgBaseline(guards={"client_sizes": [3, -1]})
    cfg = cfg_for({"name": "fedavg", "guards": {"norm_bound": 3.0, "norm_mode": "clip"}})
    s = build_strategy(build_experiment(cfg))
    assert s.guards["norm_bound"] == 3.0 and s.guards["norm_mode"] == "clip"


def test_guard_functions():
    norms = torch.tensor([1.0, 2.0, 4.0, 5.0, 1e30], dtype=torch.float64)
    f = guards.norm_factors(norms, 10.0, None)
    assert f[:4].tolist() == [1.0] * 4 and float(norms[4] * f[4]) == pytest.approx(40.0)
    assert guards.norm_factors(norms, None, 3.0).tolist()[:3] == [1.0, 1.0, 0.75]
    assert guards.norm_factors(torch.zeros(3, dtype=torch.float64), 10.0, None).tolist() == [1.0] * 3
    # two replies: the lower median is the smaller, so one extreme reply cannot raise its own bound
    assert float(guards.norm_factors(torch.tensor([1.0, 1e9], dtype=torch.float64), 10.0, None)[1]) == \
        pytest.approx(1e-8)
    assert guards.cap_counts(torch.tensor([0.0, 10.0, 20.0, 1e18], dtype=torch.float64), 10.0, None).tolist() == \
        [0.0, 10.0, 20.0, 200.0]
    assert guards.relative_outliers(torch.tensor([1.0, 1.2, 50.0], dtype=torch.float64), 10.0).tolist() == \
        [False, False, True]
    for bad in (float("inf"), float("nan"), [1], "3", True):
        with pytest.raises(guards.GuardError):
            guards.finite_number(bad, "x")
    with pytest.raises(guards.GuardError, match="whole"):
        guards.finite_number(1.5, "x", integer=True)
    assert guards.finite_number(12.0, "x", integer=True) == 12.0


@pytest.mark.parametrize("mode", ["reject", "clip"])
def test_onebit_huge_scale_is_bounded(mode, caplog):
    """OneBitCS ϱ = 3e38 made every round non-finite; the norm guard bounds it like any payload scale."""
    def huge_rho(reply, rnd):
        arrays = reply.content[keys.ARRAYS]
        arrays["rho"] = Array(np.full(arrays["rho"].numpy().shape, 3e38, np.float32))
        return reply

    cfg = cfg_for({"name": "onebit_cs", "compression": 2, "phi": "common", "guards": {"norm_mode": mode}})
    rows, _, _ = run_tampered(cfg, huge_rho, caplog)
    assert all(r["replies_clipped" if mode == "clip" else "clients_rejected"] == 1 for r in rows[1:])
    assert all(math.isfinite(r["test_accuracy"]) and r["test_accuracy"] > 0.05 for r in rows)


def test_rlc_huge_reported_norm_rejected(caplog):
    cfg = cfg_for({"name": "rlc", "gain": 4, "diagnostics": True}, channel={"snr_db": 20.0, "fading": "none"})
    rows, _, _ = run_tampered(cfg, set_metric(keys.UPDATE_NORM, 3e38), caplog)
    assert all(r["clients_rejected"] == 1 for r in rows[1:])
    assert any("update-norm" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


# ---------------------------------------------------------------- bits counted by the server
def test_declared_bits_never_trusted_and_logged_once(caplog):
    def lie(reply, rnd):
        reply.content[keys.PAYLOAD_META][keys.P_BITS] = 2**62
        reply.content[keys.METRICS][keys.UPLINK_BITS] = 0
        return reply

    cfg = cfg_for({"name": "compressed"}, {"name": "topk", "k": 20, "index_coding": "fixed"}, rounds=3, clients=4)
    rows, s, nodes = run_tampered(cfg, lie, caplog)
    d = s._global_vector.numel()
    per_client = 20 * 32 + 8 * math.ceil(20 * math.ceil(math.log2(d)) / 8)  # values + packed indices, byte-padded
    # the lying reply is used (its bits counted by the server) or rejected for its claim: never recorded
    assert all(r["uplink_bits"] == r["clients_ok"] * per_client and r["clients_ok"] >= K - 1 for r in rows[1:])
    told = [r.getMessage() for r in caplog.records if "declared" in r.getMessage()]
    # the same client lied in each of 3 rounds (clients = clients_per_round): one line in all
    assert len(rows) == 4 and len(set(nodes)) == 1
    assert len(told) == 1 or all(r["clients_rejected"] == 1 for r in rows[1:]), told


def test_fedavg_bits_are_the_arrays_that_arrived():
    def lie(reply):
        reply.content[keys.METRICS][keys.UPLINK_BITS] = 2**62
        return reply

    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0)
    _, metrics = toy_round(s, lie)
    assert metrics["uplink_bits"] == 5 * 32 * D


def test_uplink_bits_are_the_packed_bytes_that_arrived(caplog):
    """The server counts 8 x the data bytes of the arrays each reply carries (top-k's variable-length index
    code included), whatever the reply declares; before packing it counted the codec's figure instead."""
    def lie(reply, rnd):
        reply.content[keys.METRICS][keys.UPLINK_BITS] = 1
        return reply

    arrived = []
    cfg = cfg_for({"name": "compressed"}, {"name": "topk", "k": 20}, rounds=1)
    exp = build_experiment(cfg)
    s = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    msgs = list(s.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = [lie(r, 1) for r in grid.send_and_receive(msgs)]
    for r in replies:
        arrays = r.content[keys.ARRAYS]
        assert sorted(arrays) == ["indices", "values"] and arrays["indices"].dtype == "uint8"
        arrived.append(8 * sum(read_array(a).nbytes for a in arrays.values()))
    _, metrics = s.aggregate_train(1, replies)
    metrics = server_part(metrics)
    assert metrics["uplink_bits"] == sum(arrived)
    assert any("declared" in r.getMessage() for r in caplog.records)
