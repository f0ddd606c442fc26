"""SecAgg+ ([Bell-2020]) on Message-API strategies: the unmasked sum is the plaintext sum up to the
fixed-point bound, a masked vector looks uniform over the field, dropouts at every stage are recovered
above the threshold and fail cleanly below it, non-linear methods are refused, and FetchSGD under
SecAgg+ learns as the plaintext run does."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from scipy.stats import chisquare

from fl_sim.clients.app import make_client_app
from fl_sim.clients.mods import compression_mod
from fl_sim.clients.secagg_mod import secagg_mod
from fl_sim.config import ConfigError, config_from_dict, load_config
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.strategies.secagg import SecAggError, SecAggPlusGrid
from fl_sim.testing import InMemoryGrid, run_in_memory
from fl_sim.wire import keys
from fl_sim.wire.records import flatten_arrays
from fl_sim.wire.secagg import MASKED, RECORD, SecAggKey, Stage

W, C, T = 1000.0, 8.0, 4194304  # Flower's defaults: max_weight, clipping_range, quantization_range
DELTA = 2 * C / T  # one fixed-point step


def _cfg(strategy: dict, clients: int = 10, per_round: int = 5, **over):
    raw = {"rounds": 2, "clients": clients, "clients_per_round": per_round,
           "data": {"name": "synthetic", "partition": "natural"},
           "model": {"name": "mlp", "hidden": [16]}, "train": {"lr": 0.05, "batch_size": 16},
           "strategy": strategy}
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


class _Dropper:
    """A ClientApp that fails (a dropout: an error reply) for some client ids at one SecAgg+ stage."""

    def __init__(self, app, cids=(), stage=None):
        self.app, self.cids, self.stage = app, set(cids), stage
        self.masked: dict[int, np.ndarray] = {}

    def __call__(self, msg, context):
        rec = msg.content.get(RECORD)
        cid = int(rec[keys.CID]) if rec is not None else None
        if rec is not None and rec[SecAggKey.STAGE] == self.stage and cid in self.cids:
            raise ConnectionError("client dropped out")
        reply = self.app(msg, context)
        if rec is not None and rec[SecAggKey.STAGE] == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            self.masked[cid] = reply.content[MASKED]["y"].numpy().astype(np.int64)
        return reply


def _plain_round(cfg):
    """One plaintext round: the strategy's update and each client's (payload tensors or Δ_i, n_i)."""
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg, mods=[compression_mod]), cfg.clients)
    msgs = list(strategy.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    w0 = flatten_arrays(exp.initial_arrays).to(torch.float64)
    per_client = {}
    for r in replies:
        cid = int(r.content[keys.METRICS][keys.M_CID])
        x = flatten_arrays(r.content[keys.ARRAYS]).to(torch.float64)
        per_client[cid] = (x if keys.PAYLOAD_META in r.content else x - w0,
                           float(r.content[keys.METRICS][keys.NUM_EXAMPLES]))
    new, _ = strategy.aggregate_train(1, replies)
    return flatten_arrays(new) - flatten_arrays(exp.initial_arrays), per_client


def _secure_round(cfg, *, drop=(), stage=None, **params):
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    app = _Dropper(make_client_app(cfg, mods=[secagg_mod, compression_mod]), drop, stage)
    grid = SecAggPlusGrid(InMemoryGrid(app, cfg.clients), strategy, **params)
    msgs = list(strategy.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    return strategy, exp, replies, app, grid


def _unmasked_mean(replies) -> torch.Tensor:
    (reply,) = replies
    return flatten_arrays(reply.content[keys.ARRAYS]).to(torch.float64)


def _bound(k: int, n_sum: float) -> float:
    # Each of the k clients' entries moves by < one step δ = 2c/T under stochastic rounding (|v| <= c, no
    # clipping here), so Σ v̂ is within k·δ of Σ v; the mean W Σ v̂ / Σ n within W k δ / Σ n; plus float32
    # rounding of the mean as the reply carries it (relative 2^-24 of a value below 1).
    return W * k * DELTA / n_sum + 1e-6


@pytest.mark.parametrize("strategy", [{"name": "fetchsgd", "rows": 3, "cols": 200, "k": 20},
                                      {"name": "fedavg"}, {"name": "fiht_cs", "compression": 4}])
def test_unmasked_sum_equals_the_plaintext_sum_within_the_quantization_bound(strategy):
    cfg = _cfg(strategy)
    plain_update, per_client = _plain_round(cfg)
    sec, exp, replies, _, grid = _secure_round(cfg, num_shares=3, reconstruction_threshold=2)
    n = torch.tensor([v[1] for v in per_client.values()], dtype=torch.float64)
    expected = sum(x * ni for x, ni in zip((v[0] for v in per_client.values()), n)) / n.sum()
    got = _unmasked_mean(replies)
    if strategy["name"] == "fedavg":
        got = got - flatten_arrays(exp.initial_arrays).to(torch.float64)
    err = float((got - expected).abs().max())
    assert err <= _bound(len(per_client), float(n.sum())), err
    assert err > 0  # it did go through the field (a plaintext pass-through would be exact)
    assert float(replies[0].content[keys.METRICS][keys.NUM_EXAMPLES]) == float(n.sum())
    new, _ = sec.aggregate_train(1, replies)
    secure_update = flatten_arrays(new) - flatten_arrays(exp.initial_arrays)
    assert sec.last_metrics["clients_ok"] == len(per_client)
    assert sec.last_metrics["secagg_bits_per_client"] > 0 and sec.last_metrics["secagg_s"] > 0
    if strategy["name"] == "fedavg":
        assert torch.allclose(secure_update, plain_update, atol=2 * _bound(len(per_client), float(n.sum())))
    else:  # a top-k / K-sparse recovery from (almost) the same aggregate: near-ties may pick other coordinates
        assert bool(secure_update.any())


def test_onebit_cs_with_a_common_phi_sums_its_dequantized_measurements():
    """1-bit CS, common Φ: each client masks aggregate_seeded([p_i]) (its own dither removed); the unmasked
    mean is the server's plaintext aggregate Σ (n_i/n) of them within the bound, and the round decodes."""
    from fl_sim.wire.records import payload_from_records

    cfg = _cfg({"name": "onebit_cs", "phi": "common", "compression": 4})
    exp = build_experiment(cfg)
    plain = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg, mods=[compression_mod]), cfg.clients)
    msgs = list(plain.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    cids = [int(r.content[keys.METRICS][keys.M_CID]) for r in replies]
    n = torch.tensor([float(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies], dtype=torch.float64)
    payloads = [payload_from_records(r.content[keys.ARRAYS], r.content[keys.PAYLOAD_META], plain.codec) for r in replies]
    expected = plain.codec.aggregate_seeded(payloads, (n / n.sum()).tolist(), [plain.client_seeds(c) for c in cids])
    sec, _, secure_replies, _, _ = _secure_round(cfg, num_shares=3, reconstruction_threshold=2)
    got = secure_replies[0].content[keys.ARRAYS]
    for name, t in expected.tensors.items():
        err = float((torch.from_numpy(got[name].numpy()).double() - t.double()).abs().max())
        assert err <= _bound(len(cids), float(n.sum())), (name, err)
    new, _ = sec.aggregate_train(1, secure_replies)
    assert new is not None and sec.last_metrics["clients_ok"] == len(cids)


def _seeded_crypto(monkeypatch, seed: int) -> None:
    """The protocol's randomness (key pairs, self-mask seeds) from a fixed seed, so a statistical test has
    one fixed outcome: keys derived from seeded integers on Flower's curve (cryptography's
    ``derive_private_key``), and ``os.urandom`` of the mod from a seeded generator."""
    import random

    from cryptography.hazmat.primitives.asymmetric import ec

    import fl_sim.clients.secagg_mod as mod

    rng = random.Random(seed)

    def key_pair():
        sk = ec.derive_private_key(rng.getrandbits(380) + 1, ec.SECP384R1())
        return sk, sk.public_key()

    monkeypatch.setattr(mod, "generate_key_pairs", key_pair)
    monkeypatch.setattr(mod.os, "urandom", lambda n: rng.getrandbits(8 * n).to_bytes(n, "little"))


def test_one_clients_masked_vector_is_uniform_over_the_field(monkeypatch):
    """Chi-square over 64 equal bins of Z_M at significance 0.001 (fixed seed): one client's masked vector as
    the server receives it passes; the same test rejects that client's unmasked field vector (its power)."""
    _seeded_crypto(monkeypatch, seed=7)
    cfg = _cfg({"name": "fetchsgd", "rows": 5, "cols": 1000, "k": 20})
    _, _, _, app, _ = _secure_round(cfg, num_shares=3, reconstruction_threshold=2)
    y = app.masked[min(app.masked)]
    M = 2**32
    assert y.size > 4000  # 5,000 table entries + 2: about 78 per bin, well above chi-square's 5
    bins = np.bincount((y * 64 // M).astype(np.int64), minlength=64)
    assert chisquare(bins).pvalue > 1e-3
    # power: without masks the field values sit around (c + v)·T/2c < T = M / 1024, all in the first bin
    from fl_sim.wire.secagg import to_field

    q, _ = to_field(torch.randn(y.size) * 1e-3, C, T, torch.Generator().manual_seed(0))
    assert chisquare(np.bincount(q * 64 // M, minlength=64)).pvalue < 1e-3


@pytest.mark.parametrize("stage", list(Stage.ALL))
@pytest.mark.parametrize("clients,dropped,shares", [(5, 1, 5), (10, 2, 5)])
def test_dropouts_at_every_stage_are_recovered(stage, clients, dropped, shares):
    cfg = _cfg({"name": "fetchsgd", "rows": 3, "cols": 100, "k": 10}, clients=clients, per_round=clients)
    _, per_client = _plain_round(cfg)
    cids = sorted(per_client)[:: max(1, clients // dropped)][:dropped]
    sec, _, replies, _, grid = _secure_round(cfg, drop=cids, stage=stage, num_shares=shares,
                                             reconstruction_threshold=3)
    # a client that dropped at unmask had already sent its masked vector: it is in the sum
    kept = [c for c in per_client if c not in cids or stage == Stage.UNMASK]
    n = torch.tensor([per_client[c][1] for c in kept], dtype=torch.float64)
    expected = sum(per_client[c][0] * ni for c, ni in zip(kept, n)) / n.sum()
    got = _unmasked_mean(replies)
    assert float((got - expected).abs().max()) <= _bound(len(kept), float(n.sum()))
    assert grid.last["clients_ok"] == len(kept)
    assert grid.last["secagg_dropped"] == clients - len(kept)


def test_below_the_threshold_the_round_fails_cleanly_or_is_skipped(caplog):
    cfg = _cfg({"name": "fetchsgd", "rows": 3, "cols": 100, "k": 10}, clients=5, per_round=5)
    _, per_client = _plain_round(cfg)
    drop = sorted(per_client)[:2]
    with pytest.raises(SecAggError, match="fewer than the threshold t=4"):
        _secure_round(cfg, drop=drop, stage=Stage.COLLECT_MASKED_VECTORS, num_shares=5, reconstruction_threshold=4)
    sec, exp, replies, _, grid = _secure_round(cfg, drop=drop, stage=Stage.COLLECT_MASKED_VECTORS, num_shares=5,
                                               reconstruction_threshold=4, on_failure="skip")
    assert replies == [] and grid.last["secagg_failed"] == 1
    new, _ = sec.aggregate_train(1, replies)
    assert new is None  # the global model is kept
    assert sec.last_metrics["secagg_failed"] == 1 and sec.last_metrics["clients_ok"] == 0


def test_a_configured_run_reports_the_protocol_beside_the_payload():
    base = ["rounds=2", "clients=6", "clients_per_round=3", "model.hidden=[8]", "strategy.name=fedavg",
            "data.name=synthetic", "secagg.enabled=true", "secagg.num_shares=3", "secagg.reconstruction_threshold=3"]
    _, rows, _ = run_in_memory(load_config(None, base))
    for r in rows[1:]:
        assert r["clients_ok"] == 3 and r["uplink_bits"] > 0 and r["secagg_bits_per_client"] > 0
        assert r["secagg_s"] > 0


@pytest.mark.parametrize("strategy,codec", [({"name": "compressed"}, "qsgd"), ({"name": "compressed"}, "topk"),
                                            ({"name": "compressed"}, "sign"), ({"name": "compressed"}, "terngrad"),
                                            ({"name": "qcs"}, "qcs"), ({"name": "onebit_cs"}, "onebit_cs"),
                                            ({"name": "fetchsgd", "mode": "local_topk"}, "topk")])
def test_methods_whose_server_decodes_each_client_are_refused_in_one_line(strategy, codec):
    over = {"codec": {"name": codec}} if strategy["name"] == "compressed" else {}
    with pytest.raises(ConfigError) as err:
        build_strategy(build_experiment(_cfg(strategy, secagg={"enabled": True}, **over)))
    msg = str(err.value)
    assert "\n" not in msg and f"codec {codec!r}" in msg and "decodes each client" in msg


def test_linear_methods_are_accepted():
    for strategy in ({"name": "fedavg"}, {"name": "fedsgd"}, {"name": "fetchsgd"}, {"name": "fiht_cs"},
                     {"name": "onebit_cs", "phi": "common"},
                     {"name": "fetchsgd", "mode": "true_topk"}):
        build_strategy(build_experiment(_cfg(strategy, secagg={"enabled": True})))


def test_daqusgd_and_rlc_are_refused():
    for name in ("daqusgd",):
        with pytest.raises(ConfigError, match="cannot run DaQuSGD"):
            build_strategy(build_experiment(_cfg({"name": name}, secagg={"enabled": True})))


def test_mods_in_the_wrong_order_fail_fast_with_the_fix(caplog):
    cfg = _cfg({"name": "fetchsgd", "rows": 3, "cols": 100, "k": 10})
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = SecAggPlusGrid(InMemoryGrid(make_client_app(cfg, mods=[compression_mod, secagg_mod]), cfg.clients),
                          strategy, num_shares=3, reconstruction_threshold=2)
    msgs = list(strategy.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    with caplog.at_level(logging.WARNING, logger="fl_sim"), pytest.raises(SecAggError):
        grid.send_and_receive(msgs)
    assert "secagg_mod must come before compression_mod" in caplog.text


@pytest.mark.parametrize("over,key", [({"num_shares": 1}, "secagg.num_shares"),
                                      ({"reconstruction_threshold": 1.5}, "secagg.reconstruction_threshold"),
                                      ({"modulus_range": 3 * 2**30}, "secagg.modulus_range"),
                                      ({"quantization_range": 2**31}, "secagg.quantization_range"),
                                      ({"on_failure": "retry"}, "secagg.on_failure")])
def test_bad_secagg_settings_are_config_errors(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg({"name": "fedavg"}, secagg={"enabled": True, **over})


def test_fetchsgd_under_secagg_learns_as_the_plaintext_run():
    """Quickstart, FetchSGD, same seed, 6 rounds: final accuracy within 0.03 of the plaintext run."""
    sets = ["rounds=6", "strategy.name=fetchsgd"]
    _, plain, _ = run_in_memory(load_config("quickstart", sets))
    _, secure, _ = run_in_memory(load_config("quickstart", sets + ["secagg.enabled=true", "secagg.num_shares=5",
                                                                   "secagg.reconstruction_threshold=3"]))
    assert secure[-1]["secagg_bits_per_client"] > 0
    assert abs(secure[-1]["test_accuracy"] - plain[-1]["test_accuracy"]) <= 0.03
    assert secure[-1]["test_accuracy"] > plain[0]["test_accuracy"] + 0.05  # it learned


@pytest.mark.parametrize("on_failure", ["skip", "raise"])
def test_a_run_below_the_threshold_goes_on_or_stops_as_configured(on_failure):
    from fl_sim.runs.simulation import server_loop

    cfg = load_config(None, ["rounds=2", "clients=6", "clients_per_round=3", "model.hidden=[8]",
                             "data.name=synthetic", "strategy.name=fetchsgd", "secagg.enabled=true",
                             "secagg.num_shares=3", "secagg.reconstruction_threshold=3",
                             f"secagg.on_failure={on_failure}"])
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    app = _Dropper(make_client_app(cfg), cids=[0], stage=Stage.COLLECT_MASKED_VECTORS)  # t = 3 of 3: one is too many
    rows: list[dict] = []
    run = lambda: server_loop(InMemoryGrid(app, cfg.clients), exp, strategy, None,  # noqa: E731
                              lambda rnd, row: rows.append(dict(row)))
    sampled = {c for r in (1, 2) for c, _ in strategy.sample(r, list(range(cfg.clients)))}
    assert 0 in sampled  # client 0 is in some round (else the test would not test anything)
    if on_failure == "raise":
        with pytest.raises(SecAggError, match="fewer than the threshold t=3"):
            run()
        return
    run()
    assert len(rows) == 3  # rounds 0, 1, 2: the run went on
    failed = [r for r in rows[1:] if r.get("secagg_failed") == 1]
    assert failed and all(r["clients_ok"] == 0 for r in failed)
    assert any(r.get("secagg_failed") is None and r["clients_ok"] == 3 for r in rows[1:]) or len(failed) == 2


def test_the_cost_benchmark_runs_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from fl_sim import cli

    out = tmp_path / "secagg.json"
    result = CliRunner().invoke(cli.app, ["bench", "secagg", "--smoke", "--drop", "0.25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["num_shares"]) for r in rows] == [(4, 4), (6, 6)]  # log n neighbourhood = all here
    assert all(r["dropped"] >= 1 and r["extra_bits_per_client"] > 0 and r["round_s"] >= 0 for r in rows)


def test_a_plain_flower_fedavg_with_its_own_clientapp_runs_under_secagg():
    """Flower's own Message-API FedAvg and a user's train function (no fl-sim strategy, no codec): the
    aggregate model is the plaintext FedAvg's within the bound, and the train_loss metric is averaged."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    d = 300

    def train(msg, context):
        w = msg.content["arrays"]["w"].numpy()
        pid = int(context.node_config["partition-id"])
        delta = np.random.default_rng(pid).standard_normal(d).astype(np.float32) * 0.1
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + delta)}),
                                   "metrics": MetricRecord({"num-examples": 10 + 5 * pid, "train_loss": 1.0 + pid})}),
                       reply_to=msg)

    arrays = ArrayRecord({"w": Array(np.zeros(d, dtype=np.float32))})

    def run(secure: bool):
        strategy = FedAvg()
        inner = InMemoryGrid((lambda m, c: secagg_mod(m, c, train)) if secure else train, 5)
        grid = SecAggPlusGrid(inner, strategy, num_shares=3, reconstruction_threshold=2) if secure else inner
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
        return strategy.aggregate_train(1, grid.send_and_receive(msgs))

    (plain, plain_metrics), (secure, secure_metrics) = run(False), run(True)
    n_sum = sum(10 + 5 * p for p in range(5))
    err = float(np.abs(plain["w"].numpy() - secure["w"].numpy()).max())
    assert 0 < err <= _bound(5, n_sum)
    assert secure_metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], abs=_bound(5, n_sum))


def test_server_side_dp_is_refused_under_secagg():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from fl_sim.strategies.fedavg import FedAvgBaseline
    from fl_sim.strategies.secagg import check_strategy

    dp = DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=1.0, clipping_norm=1.0,
                                                   num_sampled_clients=5)
    for strategy in (dp, FedAvgBaseline(dp)):
        with pytest.raises(ValueError, match="server-side DP clips each client's update"):
            check_strategy(strategy)
    check_strategy(FedAvgBaseline(FedAvg()))  # plain FedAvg: fine


def test_the_size_table_bounds_the_weight_sum_not_the_one_aggregate_reply(caplog):
    """The reply guards' per-client size table would cap the aggregate reply as one client; under SecAgg+ it
    checks Σ n_i against the survivors' sizes instead, and a client overstating its weight is logged."""
    cfg = _cfg({"name": "fetchsgd", "rows": 3, "cols": 100, "k": 10})
    with caplog.at_level(logging.WARNING, logger="fl_sim"):
        sec, _, replies, _, _ = _secure_round(cfg, num_shares=3, reconstruction_threshold=2)
        sec.aggregate_train(1, replies)
    assert "capped the num-examples" not in caplog.text and "overstates" not in caplog.text
    assert sec.last_metrics["weights_capped"] == 0

    exp = build_experiment(cfg)
    strategy = build_strategy(exp)

    def liar(msg, context):
        reply = app(msg, context)
        metrics = reply.content.get(keys.METRICS) if not reply.has_error() else None
        if metrics is not None and keys.NUM_EXAMPLES in metrics:
            metrics[keys.NUM_EXAMPLES] = 10**6  # every client claims a million examples
        return reply

    app = make_client_app(cfg, mods=[compression_mod])
    grid = SecAggPlusGrid(InMemoryGrid(lambda m, c: secagg_mod(m, c, liar), cfg.clients), strategy,
                          num_shares=3, reconstruction_threshold=2, max_weight=1e7)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="fl_sim"):
        grid.send_and_receive(list(strategy.configure_train(1, exp.initial_arrays, ConfigRecord(), grid)))
    assert "overstates its num-examples" in caplog.text
