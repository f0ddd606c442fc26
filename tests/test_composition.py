"""A method composes with the rest of a Flower app: the wrapped strategy's own ``start`` and methods,
Flower's differential-privacy wrappers and clipping mods (docs/privacy.md, one test per table cell),
and a ClientApp without compression_mod failing in its first round.

All on the in-memory grid: the ClientApps (with Flower's own mods) are plain function calls.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Result,
)
from flwr.supercore import log as flwr_log

from fl_sim.wire import keys
from fl_sim.clients import compression_mod
from fl_sim.wire.records import payload_from_records
from fl_sim.strategies import QCS, CompressedFedAvg, FedAvgBaseline, FetchSGD, FIHTCS, RLCOverTheAir
from fl_sim.strategies.base import ClientSetupError
from fl_sim.strategies.privacy import PrivacyCompositionError
from fl_sim.testing import InMemoryGrid

D = 300  # model parameters: a (20, 10) weight and a (100,) bias
NODES = 4


def initial_arrays() -> ArrayRecord:
    g = np.random.default_rng(0)
    return ArrayRecord({"weight": Array(g.normal(size=(20, 10)).astype(np.float32)),
                        "bias": Array(np.zeros(100, np.float32))})


def client_update(pid: int) -> np.ndarray:
    """Client ``pid``'s update Δ_pid: a fixed direction of norm 2·(pid + 1) (norms 2, 4, 6, 8)."""
    v = np.random.default_rng(100 + pid).normal(size=D)
    return (2.0 * (pid + 1) * v / np.linalg.norm(v)).astype(np.float32)


def flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().reshape(-1) for a in arrays.values()]).astype(np.float64)


def unflat(like: ArrayRecord, vector: np.ndarray) -> ArrayRecord:
    out, i = {}, 0
    for name, a in like.items():
        n = a.numpy().size
        out[name] = Array(vector[i:i + n].reshape(a.numpy().shape).astype(np.float32))
        i += n
    return ArrayRecord(out)


def user_app(mods=(compression_mod,), calls: list | None = None, examples: int = 10) -> ClientApp:
    """A Flower ClientApp that returns w + Δ_pid (and records the lr it was sent)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if calls is not None:
            calls.append(pid)
        received = msg.content["arrays"]
        model = unflat(received, flat(received) + client_update(pid))
        config = next(iter(msg.content.config_records.values()))
        metrics = MetricRecord({"num-examples": examples, "train_loss": 1.0, "lr_seen": float(config.get("lr", 0.0))})
        return Message(RecordDict({"arrays": model, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"eval_acc": 0.5, "num-examples": 10})}), reply_to=msg)

    return app


def clip(v: np.ndarray, c: float) -> np.ndarray:
    return v * min(1.0, c / np.linalg.norm(v))


def mean_clipped(c: float) -> np.ndarray:
    """Flower's DP aggregate without noise: the mean (equal weights) of the clipped updates."""
    return np.mean([clip(client_update(p).astype(np.float64), c) for p in range(NODES)], axis=0)


def run(strategy, mods=(compression_mod,), rounds=1, calls=None, **start):
    grid = InMemoryGrid(user_app(mods, calls), NODES)
    return strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=rounds, **start)


def fedavg(**kw) -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES, **kw)


# ------------------------------------------------------------------ 1. the wrapped strategy's own start and methods
class CustomFedAvg(FedAvg):
    """Shaped like Flower's advanced-pytorch strategy: its own ``start`` (the round loop, logging, a
    results.json per round, a checkpoint of the best model), a learning-rate schedule in
    ``configure_train``, and a method the ServerApp calls before the run."""

    def set_save_path_and_run_dir(self, path: Path, run_dir: str) -> None:
        self.save_path, self.run_dir = path, run_dir

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 2:
            config["lr"] = config["lr"] * 0.5
        return super().configure_train(server_round, arrays, config, grid)

    def _update_best(self, rnd: int, accuracy: float, arrays: ArrayRecord) -> None:
        if accuracy > self.best_acc_so_far:
            self.best_acc_so_far = accuracy
            torch.save(arrays.to_torch_state_dict(), self.save_path / f"best_round_{rnd}.pt")
            flwr_log(logging.INFO, "New best global model: %f", accuracy)

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, train_config=None, evaluate_config=None,
              evaluate_fn=None) -> Result:
        self.best_acc_so_far = 0.0
        flwr_log(logging.INFO, "Starting %s strategy (custom loop)", type(self).__name__)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays, rows = Result(), initial_arrays, []
        for rnd in range(1, num_rounds + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            new, train_metrics = self.aggregate_train(rnd, replies)
            if new is not None:
                result.arrays = arrays = new
            replies = grid.send_and_receive(self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                            timeout=timeout)
            self.aggregate_evaluate(rnd, replies)
            res = evaluate_fn(rnd, arrays)
            self._update_best(rnd, res["accuracy"], arrays)
            rows.append({"round": rnd, "train_metrics": dict(train_metrics or {})})
            (self.save_path / "results.json").write_text(json.dumps(rows))
        return result


def test_a_wrapped_strategy_keeps_its_own_start_and_methods(tmp_path, caplog):
    """QCS(CustomFedAvg): the ServerApp's set_save_path_and_run_dir reaches the inner through the wrapper
    (was: AttributeError), the inner's own start runs (was: Flower's start, no results.json, no checkpoint)
    while QCS compresses every round (its server figures and the codec's bits are in the inner's results),
    and the inner's own configure_train (its lr schedule) still shapes what the clients get."""
    strategy = QCS(CustomFedAvg(fraction_evaluate=0.0, min_available_nodes=NODES), k=16, levels=4)
    strategy.set_save_path_and_run_dir(tmp_path, "run-1")
    accuracies = iter([0.3, 0.5, 0.4])  # round 2 is the best
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = run(strategy, rounds=3, train_config=ConfigRecord({"lr": 0.1}),
                     evaluate_fn=lambda rnd, arrays: MetricRecord({"accuracy": next(accuracies)}))
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        train = row["train_metrics"]
        assert train["server.clients_ok"] == NODES  # QCS's aggregate_train ran under the inner's loop
        assert 0 < train["uplink-bits"] < 32 * D  # compressed (QCS: 4 levels on 16 of 256 coordinates)
        assert isinstance(train["uplink-bits"], int)
    assert [r["train_metrics"]["lr_seen"] for r in rows] == pytest.approx([0.1, 0.05, 0.05])  # halved at round 2, kept after
    assert sorted(p.name for p in tmp_path.glob("best_round_*.pt")) == ["best_round_1.pt", "best_round_2.pt"]
    assert strategy.best_acc_so_far == strategy.inner.best_acc_so_far == 0.5  # the inner's state, read through
    assert strategy.inner.save_path == tmp_path and "save_path" not in vars(strategy)
    lines = [r.getMessage() for r in caplog.records]
    assert "Starting CustomFedAvg strategy (custom loop)" in lines
    assert any("QCS (fl-sim) around CustomFedAvg" in line for line in lines)  # the wrapper's summary
    assert len(result.arrays) == 2


def test_flowers_start_still_runs_an_inner_without_its_own():
    strategy = QCS(fedavg(), k=16)
    result = run(strategy, rounds=2)
    assert strategy.rounds_aggregated == 2 and len(result.arrays) == 2


def test_an_attribute_neither_has_is_an_attribute_error_naming_both():
    strategy = QCS(fedavg(), k=16)
    assert strategy.fraction_evaluate == 0.0  # the inner's attribute
    with pytest.raises(AttributeError, match="QCS.*around FedAvg.*no_such_thing"):
        strategy.no_such_thing  # noqa: B018
    assert not hasattr(strategy, "__deepcopy_hook__")


# ------------------------------------------------------------------ 2. differential privacy (docs/privacy.md)
C = 3.0  # clipping norm: clients 1-3 (norms 4, 6, 8) are clipped, client 0 (norm 2) is not
DECODES_EACH = {
    "identity": lambda inner: CompressedFedAvg(inner, codec="identity"),
    "qcs": lambda inner: QCS(inner, k=16, levels=4),
}


def update_of(result) -> np.ndarray:
    return flat(result.arrays) - flat(initial_arrays())


def test_client_side_clipping_before_compression_gives_flowers_aggregate():
    """Cell: client-side fixed clipping, mods=[compression_mod, fixedclipping_mod], a method that decodes
    each client. With the identity codec and no noise the model moves by the mean of the clipped updates,
    exactly Flower's client-side DP aggregate."""
    strategy = DifferentialPrivacyClientSideFixedClipping(DECODES_EACH["identity"](fedavg()), noise_multiplier=0.0,
                                                          clipping_norm=C, num_sampled_clients=NODES)
    result = run(strategy, mods=(compression_mod, fixedclipping_mod))
    assert np.allclose(update_of(result), mean_clipped(C), atol=1e-5)


def test_client_side_clipping_mod_encodes_the_clipped_update():
    """The two mods called directly: the payload compression_mod sends decodes to clip(Δ), not Δ."""
    app = user_app(mods=(compression_mod, fixedclipping_mod))
    arrays = initial_arrays()
    config = ConfigRecord({keys.CODEC: "identity", keys.SEED: 1, "clipping_norm": C})
    msg = Message(RecordDict({"arrays": arrays, "config": config}), message_type=MessageType.TRAIN, dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error()
    payload = payload_from_records(reply.content["arrays"], reply.content[keys.PAYLOAD_META])
    (sent,) = payload.tensors.values()
    assert np.allclose(sent.numpy().astype(np.float64), clip(client_update(3).astype(np.float64), C), atol=1e-5)


@pytest.mark.parametrize("clipper", [fixedclipping_mod, adaptiveclipping_mod])
def test_clipping_mod_outside_compression_mod_fails_naming_the_order(clipper):
    """Cell: mods=[fixedclipping_mod, compression_mod] (the wrong order). compression_mod answers with an
    error naming the right order (was: the clipping mod got the payload back and the round hung or
    failed), and the server's first round stops the run with that reason."""
    strategy = DifferentialPrivacyClientSideFixedClipping(QCS(fedavg(), k=16), noise_multiplier=0.0,
                                                          clipping_norm=C, num_sampled_clients=NODES)
    with pytest.raises(ClientSetupError, match=rf"mods=\[compression_mod, {clipper.__name__}\]"):
        run(strategy, mods=(clipper, compression_mod))


def test_client_side_clipping_is_enforced_after_decoding():
    """A codec may enlarge the clipped update (QCS rescales the k kept coordinates of each block): the
    server clips each decoded Δ̂_i to C again, so the aggregate's sensitivity stays C/m and, with no noise,
    ‖Δ̄‖ ≤ mean ‖Δ̂_i‖ ≤ C. Without that second clip QCS's decoded updates here have norms near 4 C."""
    method = DECODES_EACH["qcs"](fedavg())
    strategy = DifferentialPrivacyClientSideFixedClipping(method, noise_multiplier=0.0, clipping_norm=C,
                                                          num_sampled_clients=NODES)
    result = run(strategy, mods=(compression_mod, fixedclipping_mod))
    assert np.linalg.norm(update_of(result)) <= C * (1 + 1e-5)
    assert method.history[1]["dp_reclipped"] == NODES  # every decoded update was larger than C


def test_client_side_adaptive_clipping_updates_its_norm_through_the_method():
    """Cell: client-side adaptive clipping (adaptiveclipping_mod after compression_mod): each client's norm
    bit (clipped or not, before compression) reaches Flower's wrapper through the method, which clips at
    0.5 and moves its norm by Flower's rule C ← C·exp(−η (b − q)), b the (here noise-free) fraction of
    clipped updates: all 4 norms exceed 0.5, b = 1, q = 0.5, η = 0.2."""
    np.random.seed(0)
    dp = DifferentialPrivacyClientSideAdaptiveClipping(DECODES_EACH["identity"](fedavg()), noise_multiplier=0.0,
                                                       num_sampled_clients=NODES, initial_clipping_norm=0.5,
                                                       clipped_count_stddev=0.0)
    result = run(dp, mods=(compression_mod, adaptiveclipping_mod))
    assert np.allclose(update_of(result), mean_clipped(0.5), atol=1e-5)
    assert dp.clipping_norm == pytest.approx(0.5 * np.exp(-0.2 * (1.0 - 0.5)))


@pytest.mark.parametrize("where", ["around", "inside"])
@pytest.mark.parametrize("method", list(DECODES_EACH))
def test_server_side_fixed_clipping_clips_each_decoded_client(where, method):
    """Cells: server-side fixed clipping around / inside a method that decodes each client. Flower's
    wrapper clips each decoded update (not the encoded payload: around, that was a broadcast ValueError)
    and, with no noise, the model moves by the mean of the clipped decoded updates (identity codec: the
    clients' own updates, so exactly mean_i clip(Δ_i))."""
    make = DECODES_EACH[method]

    def dp(inner):
        return DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=C,
                                                          num_sampled_clients=NODES)

    strategy = dp(make(fedavg())) if where == "around" else make(dp(fedavg()))
    result = run(strategy, rounds=2)
    moved = update_of(result)
    if method == "identity":
        assert np.allclose(moved, 2 * mean_clipped(C), atol=1e-4)  # two rounds, the same updates
    assert np.linalg.norm(moved) <= 2 * C * (1 + 1e-5)


def test_server_side_noise_is_flowers_around_a_method():
    """Around a method, Flower's noise: N(0, σ²) per coordinate on the aggregate, σ = z C / m
    (compute_stdv) = 1.0 · 3 / 4 = 0.75. The sample standard deviation of the 300 coordinates of
    (update − mean of clipped updates) has relative standard error ≈ 1/√(2·300) = 4.1%; 20% is ~5 SE."""
    np.random.seed(1)  # Flower draws its noise from numpy's global generator
    strategy = DifferentialPrivacyServerSideFixedClipping(DECODES_EACH["identity"](fedavg()), noise_multiplier=1.0,
                                                          clipping_norm=C, num_sampled_clients=NODES)
    noise = update_of(run(strategy)) - mean_clipped(C)
    assert abs(noise.std() / 0.75 - 1) < 0.2
    assert abs(noise.mean()) < 5 * 0.75 / np.sqrt(D)


def test_server_side_adaptive_clipping_around_a_method():
    """Cell: server-side adaptive clipping around a method: per-client clipping at the current norm and
    Flower's norm update from the (here noise-free) clipped fraction."""
    dp = DifferentialPrivacyServerSideAdaptiveClipping(DECODES_EACH["identity"](fedavg()), noise_multiplier=0.0,
                                                       num_sampled_clients=NODES, initial_clipping_norm=C,
                                                       clipped_count_stddev=0.0)
    result = run(dp)
    assert np.allclose(update_of(result), mean_clipped(C), atol=1e-5)
    assert dp.clipping_norm == pytest.approx(C * np.exp(-0.2 * (3 / 4 - 0.5)))  # 3 of 4 clipped


COMPRESSED_DOMAIN = {
    "fiht_cs": lambda inner: FIHTCS(inner, compression=4, sparsity=20),
    "fetchsgd": lambda inner: FetchSGD(inner, rows=3, cols=40, k=20),
    "rlc": lambda inner: RLCOverTheAir(inner, gain=2, channel={"snr_db": 20.0}),
    "count_sketch": lambda inner: CompressedFedAvg(inner, codec="count_sketch",
                                                   codec_params={"rows": 3, "cols": 40, "k": 20}),
}
DP_KINDS = {
    "server_fixed": lambda s: DifferentialPrivacyServerSideFixedClipping(s, 1.0, C, NODES),
    "server_adaptive": lambda s: DifferentialPrivacyServerSideAdaptiveClipping(s, 1.0, NODES, clipped_count_stddev=1.0),
    "client_fixed": lambda s: DifferentialPrivacyClientSideFixedClipping(s, 1.0, C, NODES),
    "client_adaptive": lambda s: DifferentialPrivacyClientSideAdaptiveClipping(s, 1.0, NODES, clipped_count_stddev=1.0),
}


@pytest.mark.parametrize("where", ["around", "inside"])
@pytest.mark.parametrize("dp_kind", list(DP_KINDS))
@pytest.mark.parametrize("method", list(COMPRESSED_DOMAIN))
def test_dp_with_a_compressed_domain_method_is_refused_before_any_client_trains(method, dp_kind, where):
    """Cells: every DP wrapper around or inside a method that aggregates in the compressed domain is refused
    in round 1's configure_train, before a message is sent (was: FIHTCS(DP(FedAvg)) clipped the same
    recovered aggregate once per client and nothing per client, silently; DP(FIHTCS) crashed)."""
    make, wrap = COMPRESSED_DOMAIN[method], DP_KINDS[dp_kind]
    strategy = wrap(make(fedavg())) if where == "around" else make(wrap(fedavg()))
    calls: list[int] = []
    with pytest.raises(PrivacyCompositionError, match="compressed domain"):
        run(strategy, mods=(compression_mod, fixedclipping_mod), calls=calls)
    assert calls == []


def test_dp_with_fl_sims_server_step_is_refused():
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvgBaseline(fedavg(), server_momentum=0.9), 1.0, C,
                                                          NODES)
    with pytest.raises(PrivacyCompositionError, match="FedAvgM"):
        run(strategy, mods=())


def test_dp_never_releases_an_unnoised_model_when_the_weights_sum_to_zero():
    """Replies whose num-examples sum to 0 make the method apply the update without its inner strategy;
    with a DP wrapper that would release a model without clipping or noise: the round releases nothing."""
    strategy = DifferentialPrivacyServerSideFixedClipping(DECODES_EACH["identity"](fedavg()), 1.0, C, NODES)
    grid = InMemoryGrid(user_app(examples=0), NODES)
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=1)
    assert len(result.arrays) == 0 and strategy.strategy.rounds_aggregated == 0


def test_the_uncompressed_baseline_takes_server_side_dp_around_it():
    strategy = DifferentialPrivacyServerSideFixedClipping(FedAvgBaseline(fedavg()), 0.0, C, NODES)
    assert np.allclose(update_of(run(strategy)), mean_clipped(C), atol=1e-5)


# ------------------------------------------------------------------ 3. a missing compression_mod fails fast
def test_first_round_without_the_mod_raises_naming_it():
    """Every reply of round 1 is a plain model: the ServerApp raises (Flower reports a failed run) instead
    of logging the same error every round and ending with the initial model (was: exit code 0)."""
    strategy = QCS(fedavg(), k=16)
    t0 = time.perf_counter()
    with pytest.raises(ClientSetupError, match=r"lacks compression_mod.*ClientApp\(mods=\[compression_mod\]\)"):
        run(strategy, mods=(), rounds=50)
    assert strategy.history == {} and time.perf_counter() - t0 < 30


def test_the_baseline_without_the_mod_raises_naming_it():
    """The uncompressed baseline needs the mod too (it ties each reply to its round): a first round whose
    replies all lack the round record fails fast with the same one-line fix, not a silent no-op run."""
    with pytest.raises(ClientSetupError, match=r"round record.*lacks compression_mod"):
        run(FedAvgBaseline(fedavg()), mods=(), rounds=5)


def test_a_later_round_without_payloads_is_logged_not_raised(caplog):
    """After a good first round, a round whose replies all lack the payload keeps the per-round handling:
    an error-level log, the model unchanged, the run goes on."""
    with_mod, without = user_app(), user_app(mods=())

    def app(msg: Message, context: Context) -> Message:
        config = msg.content.get("config")
        later = isinstance(config, ConfigRecord) and int(config.get(keys.ROUND, 1)) > 1
        return (without if later else with_mod)(msg, context)

    strategy = QCS(fedavg(), k=16)
    grid = InMemoryGrid(app, NODES)
    with caplog.at_level(logging.ERROR, logger="fl_sim"):
        strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=3)
    assert strategy.rounds_aggregated == 1
    assert sorted(strategy.history) == [1, 2, 3] and strategy.history[3]["clients_ok"] == 0
    assert any("none of the 4 replies" in r.getMessage() and "compression_mod" in r.getMessage()
               for r in caplog.records)


def test_an_undeclared_aggregate_under_dp_is_refused_at_aggregation():
    """A method that returns an aggregate from combine but claims to decode each client (a user's own,
    wrongly declared) is stopped when it hands the aggregate over, not clipped as if it were a client."""

    class Undeclared(FedAvgBaseline):
        def combine(self, server_round, replies, weights):
            return torch.stack([r.data for r in replies]).mean(dim=0)

    strategy = DifferentialPrivacyServerSideFixedClipping(Undeclared(fedavg()), 0.0, C, NODES)
    with pytest.raises(PrivacyCompositionError, match="decodes_each_client"):
        run(strategy)
