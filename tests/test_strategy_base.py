"""UpdateStrategy / FedAvg baselines driven through the in-memory grid with a toy ClientApp.

The toy client returns w + (cid + 1) * 1 with n_cid = cid + 1 examples, so every aggregate is known
in closed form.
"""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.wire import keys
from fl_sim.clients import compression_mod
from fl_sim.wire.records import flatten_arrays
from fl_sim.strategies import FedAvgBaseline, FedSGD
from fl_sim.strategies.base import SERVER_PREFIX, update_sparsity
from fl_sim.testing import InMemoryGrid

D = 7


def toy_app(mods=None):
    app = ClientApp(mods=[compression_mod] if mods is None else mods)

    @app.train()
    def _train(msg: Message, ctx):
        cid = int(msg.content[keys.CONFIG][keys.CID])
        arrays = msg.content[keys.ARRAYS]
        out = ArrayRecord({k: Array(a.numpy() + (cid + 1.0)) for k, a in arrays.items()})
        metrics = MetricRecord({keys.NUM_EXAMPLES: cid + 1, keys.TRAIN_LOSS: 1.0 / (cid + 1), keys.M_CID: cid})
        return Message(RecordDict({keys.ARRAYS: out, keys.METRICS: metrics}), reply_to=msg)

    return app


def initial():
    return ArrayRecord({"w": Array(np.zeros((3,), np.float32)), "b": Array(np.zeros((4,), np.float32))})


def server_part(metrics):
    """The server-side figures of a returned MetricRecord (named ``server.<name>``), unprefixed."""
    return {k[len(SERVER_PREFIX):]: v for k, v in metrics.items() if k.startswith(SERVER_PREFIX)}


def one_round(strategy, grid, rnd=1):
    msgs = list(strategy.configure_train(rnd, initial(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    return msgs, (arrays, server_part(metrics))


def test_fedavg_weighted_mean_and_bits():
    grid = InMemoryGrid(toy_app(), 10)
    s = FedAvgBaseline(clients_per_round=4, client_ids=range(10), seed=3)
    msgs, (arrays, metrics) = one_round(s, grid)
    cids = sorted(int(m.content[keys.CONFIG][keys.CID]) for m in msgs)
    n = np.array(cids) + 1.0
    expected = float((n * n).sum() / n.sum())  # update of client c is (c+1), weight (c+1)
    got = flatten_arrays(arrays)
    assert torch.allclose(got, torch.full((D,), expected), atol=1e-6)
    assert metrics["uplink_bits"] == 4 * 32 * D
    assert metrics["downlink_bits"] == 4 * 32 * D
    assert metrics["clients_ok"] == 4 and metrics["clients_failed"] == 0
    assert metrics["compression_ratio"] == pytest.approx(1.0)
    assert metrics["update_sparsity"] == pytest.approx(1.0)  # a constant update: all magnitudes equal


def test_sampling_is_seeded_and_routes_to_nodes():
    grid = InMemoryGrid(toy_app(), 10)
    a = [int(m.content[keys.CONFIG][keys.CID]) for m in FedAvgBaseline(clients_per_round=5, client_ids=range(10), seed=1).configure_train(1, initial(), ConfigRecord(), grid)]
    b = [int(m.content[keys.CONFIG][keys.CID]) for m in FedAvgBaseline(clients_per_round=5, client_ids=range(10), seed=1).configure_train(1, initial(), ConfigRecord(), grid)]
    c = [int(m.content[keys.CONFIG][keys.CID]) for m in FedAvgBaseline(clients_per_round=5, client_ids=range(10), seed=2).configure_train(1, initial(), ConfigRecord(), grid)]
    assert a == b and a != c and len(set(a)) == 5


def test_failed_and_missing_replies_are_skipped():
    grid = InMemoryGrid(toy_app(), 6)
    s = FedAvgBaseline(clients_per_round=6, client_ids=range(6), seed=0)
    grid.fail_nodes = {grid.node_ids[0]}
    grid.drop_nodes = {grid.node_ids[5]}
    _, (arrays, metrics) = one_round(s, grid)
    n = np.array([2.0, 3.0, 4.0, 5.0])  # clients 1..4 remain
    expected = float((n * n).sum() / n.sum())
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), expected), atol=1e-6)
    assert metrics["clients_ok"] == 4 and metrics["clients_failed"] == 1


@pytest.mark.parametrize("tamper", ["nan", "shape", "no-examples"])
def test_malformed_reply_rejected_not_poisoning(tamper, caplog):
    grid = InMemoryGrid(toy_app(), 4)

    def bad(reply):
        if int(reply.content[keys.METRICS][keys.M_CID]) != 2:
            return reply
        if tamper == "nan":
            reply.content[keys.ARRAYS] = ArrayRecord({"w": Array(np.full(3, np.nan, np.float32)), "b": Array(np.zeros(4, np.float32))})
        elif tamper == "shape":
            reply.content[keys.ARRAYS] = ArrayRecord({"w": Array(np.zeros(5, np.float32))})
        else:
            reply.content[keys.METRICS] = MetricRecord({keys.M_CID: 2})
        return reply

    grid.tamper = bad
    s = FedAvgBaseline(clients_per_round=4, client_ids=range(4), seed=0)
    with caplog.at_level("ERROR", logger="fl_sim"):
        _, (arrays, metrics) = one_round(s, grid)
    got = flatten_arrays(arrays)
    assert torch.isfinite(got).all()
    n = np.array([1.0, 2.0, 4.0])
    assert torch.allclose(got, torch.full((D,), float((n * n).sum() / n.sum())), atol=1e-6)
    assert metrics["clients_failed"] == 1
    assert any("client 2" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


def test_no_usable_replies_keeps_model():
    grid = InMemoryGrid(toy_app(), 3)
    grid.drop_nodes = set(grid.node_ids)
    s = FedAvgBaseline(clients_per_round=3, client_ids=range(3))
    _, (arrays, metrics) = one_round(s, grid)
    assert arrays is None and metrics["clients_ok"] == 0


def test_fedsgd_server_lr_and_momentum():
    grid = InMemoryGrid(toy_app(), 3)
    s = FedSGD(clients_per_round=3, client_ids=range(3), server_lr=0.5, server_momentum=0.9)
    n = np.array([1.0, 2.0, 3.0])
    mean_update = float((n * n).sum() / n.sum())
    _, (a1, _) = one_round(s, grid, 1)
    assert torch.allclose(flatten_arrays(a1), torch.full((D,), 0.5 * mean_update), atol=1e-6)
    # second round from the same starting point: m = 0.9 * mean + mean
    _, (a2, _) = one_round(s, grid, 2)
    assert torch.allclose(flatten_arrays(a2), torch.full((D,), 0.5 * 1.9 * mean_update), atol=1e-5)


def test_strategy_argument_errors():
    with pytest.raises(ValueError, match="server_lr"):
        FedSGD(server_lr=0)
    with pytest.raises(ValueError, match="exceeds"):
        FedAvgBaseline(clients_per_round=5, client_ids=range(3))


def test_defaults_are_flowers_fedavg_defaults():
    """Wrapping a method "instead of FedAvg(...)" must not change the run. The old wrapper defaulted to
    fraction_evaluate 0.0 and min nodes 1; the inner FedAvg now has Flower's own defaults."""
    from flwr.serverapp.strategy import FedAvg

    s = FedAvgBaseline(clients_per_round=2, client_ids=range(2))
    ref = FedAvg()
    for name in ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                 "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key"):
        assert getattr(s.inner, name) == getattr(ref, name), name
    assert s.inner.fraction_evaluate == 1.0 and s.inner.min_available_nodes == 2
    assert math.isclose(s.server_lr, 1.0)


def test_update_sparsity_of_k_sparse_equal_magnitude_is_k_over_d():
    # sp(g) = ||g||_1^2 / (d ||g||_2^2): K entries of magnitude a give (K a)^2 / (d K a^2) = K/d exactly.
    d, k = 1000, 37
    g = torch.zeros(d)
    idx = torch.randperm(d, generator=torch.Generator().manual_seed(0))[:k]
    g[idx] = 2.5 * torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0)  # signs do not matter
    assert update_sparsity(g) == pytest.approx(k / d, rel=1e-12)
    assert update_sparsity(torch.ones(d)) == pytest.approx(1.0)
    one = torch.zeros(d)
    one[5] = -3.0
    assert update_sparsity(one) == pytest.approx(1.0 / d)
    assert math.isnan(update_sparsity(torch.zeros(d)))
    # unequal magnitudes fall strictly between 1/d and 1
    assert 1.0 / d < update_sparsity(torch.arange(1.0, d + 1)) < 1.0


def test_clients_sharing_a_node_with_context_residuals_are_sent_in_waves():
    """Client EF with residuals in node contexts and fewer nodes than clients: no send_and_receive call
    carries two messages to one node (Flower's engine would run them at once and keep one context), and
    the run equals the one-node-per-client run."""
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import server_loop
    from fl_sim.testing import InMemoryGrid

    class RecordingGrid(InMemoryGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            calls.append([m.metadata.dst_node_id for m in messages])
            return super().send_and_receive(messages, timeout=timeout)

    def run(config, nodes):
        cfg = load_config(config, ["rounds=3", "clients=12", "clients_per_round=6", "model.hidden=[8]",
                                   "eval_every=1", "simulation.backend=inline"])
        exp = build_experiment(cfg)
        rows: list[dict] = []
        server_loop(RecordingGrid(make_client_app(cfg), nodes), exp, build_strategy(exp, min_available_nodes=nodes),
                    None, lambda r, row: rows.append({k: v for k, v in row.items() if k not in ("wall_s", "round_s")}))
        return rows

    calls: list[list[int]] = []
    shared = run("configs/topk_ef.yaml", 3)
    train_calls = [c for c in calls if c]
    assert len(train_calls) > 3  # some round needed more than one wave
    assert all(len(set(c)) == len(c) for c in train_calls)
    assert shared == run("configs/topk_ef.yaml", 12)
    calls.clear()
    run("configs/qsgd.yaml", 3)  # nothing held in node contexts: one call per round, shared nodes allowed
    assert any(len(set(c)) < len(c) for c in calls if c)


@pytest.mark.parametrize("weight", ["cid", "zero"])
def test_new_global_model_holds_plain_flower_arrays(weight):
    """The model the wrapper hands its inner K times is kept parsed (fl_sim.wire.records.ParsedArray); the global
    model it returns must hold plain Arrays (a deflated ParsedArray names a class a receiver cannot inflate),
    also when every weight is 0 and the inner is skipped."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def _train(msg: Message, ctx):
        cid = int(msg.content[keys.CONFIG][keys.CID])
        out = ArrayRecord({k: Array(a.numpy() + 1.0) for k, a in msg.content[keys.ARRAYS].items()})
        n = cid + 1 if weight == "cid" else 0
        metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.TRAIN_LOSS: 1.0, keys.M_CID: cid})
        return Message(RecordDict({keys.ARRAYS: out, keys.METRICS: metrics}), reply_to=msg)

    s = FedSGD(clients_per_round=3, client_ids=range(6), seed=1, server_lr=0.5)  # a server step: one shared model
    _, (arrays, _) = one_round(s, InMemoryGrid(app, 6))
    assert arrays is not None and all(type(a) is Array for a in arrays.values())
    assert torch.allclose(flatten_arrays(arrays), torch.full((D,), 0.5))
