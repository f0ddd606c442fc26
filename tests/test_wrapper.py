"""Every method wraps any Flower strategy, Flower's own loop and logs run unchanged.

* an unmodified Flower-style app (its own ClientApp reporting ``train_loss`` and a custom metric, its
  own FedAdam) wrapped by each method: its metrics, fl-sim's per-client bits and Flower's log lines
  survive;
* parity: the identity codec around FedAvg gives FedAvg's numbers and Flower's log lines round for round;
* FedAdam+QCS and FedProx+FIHTCS learn on the quickstart task;
* FedAvg's keys (arrayrecord_key, weighted_by_key) work, a round whose replies are all rejected is an
  error-level log, and the layering holds (compression/channels import no flwr; strategies and
  clients never import each other).

All on the in-memory grid (no Ray): the clients are plain function calls.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fl_sim.clients import compression_mod
from fl_sim.strategies import FIHTCS, QCS, CompressedFedAvg, FetchSGD, OneBitCS, RLCOverTheAir
from fl_sim.testing import InMemoryGrid

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ a Flower-style user app
# What a user's app looks like after the README's change: a PyTorch model, its own train/evaluate
# handlers, its own metric names ("train_loss", "my_metric"), the mod added to the ClientApp.

IN, OUT = 20, 4


def user_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, OUT))


def user_data(partition: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + partition)
    w = torch.Generator().manual_seed(7)  # one labelling rule for every client
    teacher = torch.randn(IN, OUT, generator=w)
    x = torch.randn(64, IN, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def user_client_app(mods=(compression_mod,)) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = user_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = user_data(int(context.node_config["partition-id"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for i in range(0, len(y), 16):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        metrics = MetricRecord({"train_loss": float(np.mean(losses)), "my_metric": 7.0, "num-examples": len(y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = user_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = user_data(int(context.node_config["partition-id"]))
        with torch.no_grad():
            acc = float((model(x).argmax(dim=1) == y).float().mean())
        return Message(RecordDict({"metrics": MetricRecord({"eval_acc": acc, "num-examples": len(y)})}), reply_to=msg)

    return app


def central_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = user_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    x, y = user_data(99)
    with torch.no_grad():
        return MetricRecord({"accuracy": float((model(x).argmax(dim=1) == y).float().mean())})


def run_user_app(strategy, rounds=2, nodes=4, caplog=None, mods=(compression_mod,)):
    grid = InMemoryGrid(user_client_app(mods), nodes)
    initial = ArrayRecord(user_model().state_dict())
    return strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, evaluate_fn=central_eval)


def flower_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr"]


D_USER = sum(p.numel() for p in user_model().parameters())  # 404

METHODS = {
    "topk": lambda inner: CompressedFedAvg(inner, codec="topk", codec_params={"k": 40}, error_feedback="classic"),
    "qcs": lambda inner: QCS(inner, k=64, levels=4),
    "onebit_cs": lambda inner: OneBitCS(inner, compression=2),
    "fetchsgd": lambda inner: FetchSGD(inner, rows=3, cols=100, k=40),
    "fiht_cs": lambda inner: FIHTCS(inner, compression=4, sparsity=40),
    "rlc": lambda inner: RLCOverTheAir(inner, gain=2, channel={"snr_db": 20.0}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_flower_app_with_its_own_fedadam_keeps_its_metrics_and_logs(name, caplog):
    """The user's `train_loss` and `my_metric` reach Flower's result (the old
    strategy read only `train-loss` and dropped the rest), FedAdam's server optimizer runs (its moments
    exist), and Flower's own per-round lines (global evaluation, federated evaluation) are logged."""
    inner = FedAdam(eta=0.01, min_available_nodes=4)
    strategy = METHODS[name](inner)
    with caplog.at_level(logging.INFO, logger="flwr"):  # an earlier run may have quieted flwr (_quiet_flower)
        result = run_user_app(strategy)
    for rnd in (1, 2):
        train = result.train_metrics_clientapp[rnd]
        assert math.isfinite(train["train_loss"]) and train["my_metric"] == pytest.approx(7.0)
        assert train["uplink-bits"] > 0  # fl-sim's per-client figure beside the app's own
        assert train["server.clients_ok"] == 4 and train["server.uplink_bits"] > 0
        assert "eval_acc" in result.evaluate_metrics_clientapp[rnd]  # Flower's federated evaluation ran
        assert "accuracy" in result.evaluate_metrics_serverapp[rnd]
    assert inner.m_t is not None and inner.v_t is not None  # FedAdam's own optimizer state
    lines = flower_lines(caplog)
    for expected in ("[ROUND 2/2]", "Initial global evaluation results", "Global evaluation",
                     "configure_evaluate: Sampled 4 nodes", "aggregate_evaluate: Received 4 results",
                     "aggregate_train: Received 4 results and 0 failures", "Strategy execution finished"):
        assert any(expected in line for line in lines), expected
    assert any(line.startswith("\t└──> Aggregated MetricRecord") and "train_loss" in line for line in lines)
    assert any(f"{type(strategy).__name__} (fl-sim) around FedAdam" in line for line in lines)
    model = flatten(result.arrays)
    assert model.numel() == D_USER and torch.isfinite(model).all()


def flatten(arrays: ArrayRecord) -> torch.Tensor:
    return torch.cat([torch.from_numpy(a.numpy()).reshape(-1).float() for a in arrays.values()])


def test_identity_codec_equals_fedavg_round_for_round(caplog):
    """Parity: FedAvg alone and CompressedFedAvg(FedAvg, identity) give the same models, client metrics,
    evaluations and Flower log lines in every round. Models agree to float32 rounding: the wrapper hands
    FedAvg w + Δ_i, which differs from w_i by at most an ulp of |w_i| (about 1e-7 relative)."""
    rounds = 3
    with caplog.at_level(logging.INFO, logger="flwr"):  # an earlier run may have quieted flwr (_quiet_flower)
        plain = run_user_app(FedAvg(), rounds=rounds)
    plain_lines = flower_lines(caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):  # an earlier run may have quieted flwr (_quiet_flower)
        wrapped = run_user_app(CompressedFedAvg(FedAvg(), codec="identity"), rounds=rounds)
    wrapped_lines = flower_lines(caplog)
    assert torch.allclose(flatten(plain.arrays), flatten(wrapped.arrays), rtol=1e-5, atol=1e-6)
    for rnd in range(1, rounds + 1):
        a, b = plain.train_metrics_clientapp[rnd], wrapped.train_metrics_clientapp[rnd]
        for key in a:  # every metric FedAvg reports, with the same value
            assert b[key] == pytest.approx(a[key], rel=1e-4), (rnd, key)
        assert b["uplink-bits"] == 32 * D_USER  # identity: float32 values
        assert plain.evaluate_metrics_clientapp[rnd]["eval_acc"] == pytest.approx(
            wrapped.evaluate_metrics_clientapp[rnd]["eval_acc"])
        assert plain.evaluate_metrics_serverapp[rnd]["accuracy"] == pytest.approx(
            wrapped.evaluate_metrics_serverapp[rnd]["accuracy"])

    # Flower's round lines, in order (the summary, the aggregated-record dumps and timings differ by design)
    def round_lines(lines):
        keep = re.compile(r"^\[ROUND|^(configure|aggregate)_(train|evaluate):|^Initial global evaluation|^Global evaluation")
        return [line for line in lines if keep.search(line)]

    assert round_lines(plain_lines) == round_lines(wrapped_lines)
    assert len(round_lines(plain_lines)) == 1 + rounds * 6


def test_weighted_by_key_and_arrayrecord_key_of_the_inner_are_used():
    """A FedAvg with weighted_by_key / arrayrecord_key of its own. The old strategy
    rejected every reply (it read only `num-examples`) and the mod raised KeyError on `arrays`."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["model"]
        out = ArrayRecord({k: type(a)(a.numpy() + (pid + 1.0)) for k, a in arrays.items()})
        metrics = MetricRecord({"samples": pid + 1, "train_loss": 0.5})
        return Message(RecordDict({"model": out, "metrics": metrics}), reply_to=msg)

    grid = InMemoryGrid(app, 3)
    inner = FedAvg(weighted_by_key="samples", arrayrecord_key="model", fraction_evaluate=0.0, min_available_nodes=3)
    strategy = CompressedFedAvg(inner, codec="topk", codec_params={"k": 4})
    from flwr.app import Array

    initial = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=1)
    n = np.array([1.0, 2.0, 3.0])
    assert np.allclose(result.arrays["w"].numpy(), (n * n).sum() / n.sum(), atol=1e-6)
    assert result.train_metrics_clientapp[1]["server.clients_ok"] == 3


def test_all_replies_rejected_is_an_error_naming_the_mod(caplog):
    """The mod forgotten, every reply is a plain model that a compressed method cannot
    read: each reply's rejection is logged, and the first round raises ClientSetupError naming
    compression_mod (a later such round is logged only: tests/test_composition.py)."""
    from fl_sim.strategies.base import ClientSetupError

    strategy = QCS(FedAvg(min_available_nodes=4), k=64)
    with caplog.at_level(logging.ERROR, logger="fl_sim"), pytest.raises(ClientSetupError, match="compression_mod"):
        run_user_app(strategy, rounds=3, mods=())
    assert strategy.rounds_aggregated == 0
    assert sum("rejected reply" in r.getMessage() for r in caplog.records) == 4


# ------------------------------------------------------------------ learning on the quickstart task
def quickstart_run(strategy_factory, rounds):
    from fl_sim.runs.build import build_experiment
    from fl_sim.clients.app import make_client_app
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import server_loop

    cfg = load_config(ROOT / "fl_sim" / "configs" / "quickstart.yaml", [f"rounds={rounds}", "eval_every=0"])
    exp = build_experiment(cfg)
    strategy = strategy_factory(exp)
    rows: list[dict] = []
    server_loop(InMemoryGrid(make_client_app(cfg), 10), exp, strategy, None, lambda r, row: rows.append(row))
    return rows, strategy


def sim_kwargs(exp):
    return dict(client_ids=exp.data.eligible_clients.tolist(), clients_per_round=10, seed=0)


def test_fedadam_qcs_learns_on_the_quickstart():
    """FedAdam (η = 0.01) around QCS: accuracy rises well above the initial model's (measured: 0.06 at
    round 0, 0.40 after 15 rounds; plain FedAvg 0.41) and Adam's moments are the inner's."""
    def make(exp):
        return QCS(FedAdam(eta=0.01, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
                   k=128, levels=4, **sim_kwargs(exp))

    rows, strategy = quickstart_run(make, 15)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.2
    assert strategy.inner.m_t is not None


def test_fedprox_fihtcs_learns_on_the_quickstart():
    """FedProx around FIHTCS (d/Q = 4) learns (measured: 0.06 at round 0, 0.37 after 15 rounds)."""
    def make(exp):
        return FIHTCS(FedProx(proximal_mu=0.01, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1),
                      compression=4, **sim_kwargs(exp))

    rows, _ = quickstart_run(make, 15)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.2


def test_fedprox_config_reaches_the_clients():
    """FedProx's proximal-mu (the inner's config) and the method's entries are in every message, each
    message with its own ConfigRecord (FedAvg shares one RecordDict across its messages)."""
    from flwr.app import Array

    strategy = FIHTCS(FedProx(proximal_mu=0.25, fraction_evaluate=0.0, min_available_nodes=2), compression=2,
                      client_ids=range(6), clients_per_round=3)
    grid = InMemoryGrid(user_client_app(), 2)
    msgs = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(8, np.float32))}), ConfigRecord(), grid))
    assert len(msgs) == 3
    for msg in msgs:
        cfg = msg.content["config"]
        assert cfg["proximal-mu"] == 0.25 and "fl-sim.codec" in cfg and "fl-sim.cid" in cfg
    assert len({id(m.content["config"]) for m in msgs}) == 3  # one ConfigRecord per message


# ------------------------------------------------------------------ layering
def _imports(path: Path, package: str) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            else:
                out.add(node.module or "")
    return out


def _package_imports(sub: str) -> dict[str, set[str]]:
    root = ROOT / "fl_sim" / sub
    result = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        result[str(rel)] = _imports(path, ".".join(rel.parts[:-1]))  # the package the file is in
    return result


def test_layering():
    """compression/ and channels/ import no flwr; strategies/ and clients/ never import each other
    (strategies/daqusgd.py once imported fl_sim.clients.daqusgd)."""
    for sub in ("compression", "channels"):
        for name, mods in _package_imports(sub).items():
            bad = sorted(m for m in mods if m == "flwr" or m.startswith("flwr."))
            assert not bad, f"{name} imports {bad}"
    for sub, other in (("strategies", "fl_sim.clients"), ("clients", "fl_sim.strategies")):
        for name, mods in _package_imports(sub).items():
            bad = sorted(m for m in mods if m == other or m.startswith(other + "."))
            assert not bad, f"{name} imports {bad}"


def test_layering_check_sees_relative_imports(tmp_path):
    """The import walker resolves `from ..clients.x import y` inside fl_sim/strategies (so the layering
    test can fail)."""
    p = tmp_path / "m.py"
    p.write_text("from ..clients.daqusgd import METHOD\nfrom . import keys\n")
    mods = _imports(p, "fl_sim.strategies")
    assert "fl_sim.clients.daqusgd" in mods and "fl_sim.strategies" in mods


def test_sizes_from_ratios_follow_the_model_dimension():
    """README's constructors are sized by d: FetchSGD(compression=, k_ratio=), FIHTCS(compression=),
    OneBitCS(compression=), RLC(gain=) give the same ratios for two model sizes without hand-rescaling."""
    for d in (1_000, 8_000):
        fetch = FetchSGD(rows=5, compression=10, k_ratio=0.02)
        assert fetch.codec_params_for(d) == {"rows": 5, "cols": d // 50, "k": d // 50}
        assert FIHTCS(compression=10, sparsity_ratio=0.01).codec_params_for(d)["measurements"] == d // 10
        assert OneBitCS(compression=4).codec_params_for(d)["measurements"] == d // 4
        assert RLCOverTheAir(gain=20).codec_params_for(d) == {"m": d // 20}


def test_checkpoint_state_holds_the_inner_strategys_moments(tmp_path):
    """Resume must continue FedAdam where it stopped: state_dict carries the inner's m_t, v_t (as tensors,
    loadable with torch.load(weights_only=True)) and load_state_dict puts them back."""
    inner = FedAdam(eta=0.01, min_available_nodes=4)
    strategy = QCS(inner, k=64)
    run_user_app(strategy, rounds=1)
    path = tmp_path / "state.pt"
    torch.save(strategy.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = QCS(FedAdam(eta=0.01), k=64)
    fresh.load_state_dict(state)
    for name in ("m_t", "v_t"):
        saved, restored = getattr(inner, name), getattr(fresh.inner, name)
        assert saved.keys() == restored.keys()
        assert all(np.array_equal(saved[k], restored[k]) for k in saved)
    assert fresh.rounds_aggregated == 1


@pytest.mark.parametrize("inner_name", ["FedAvgM", "FedYogi", "FedAdagrad", "FedProx", "FedMedian", "FedTrimmedAvg"])
def test_any_flower_strategy_can_be_the_inner_one(inner_name):
    """Methods once inherited from FedAvg and could not be combined with any other
    strategy. Each of Flower's Message-API strategies aggregates top-k + EF updates here (per-client
    models w + Δ_i, so robust aggregators like FedMedian see every client)."""
    import flwr.serverapp.strategy as flower

    inner = getattr(flower, inner_name)(min_available_nodes=4)
    strategy = CompressedFedAvg(inner, codec="topk", codec_params={"k": 100}, error_feedback="classic")
    result = run_user_app(strategy, rounds=2)
    assert strategy.rounds_aggregated == 2
    assert math.isfinite(result.train_metrics_clientapp[2]["train_loss"])
    model = flatten(result.arrays)
    assert torch.isfinite(model).all() and not torch.equal(model, flatten(ArrayRecord(user_model().state_dict())))
