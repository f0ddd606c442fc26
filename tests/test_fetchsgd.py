"""FetchSGD ([Rothchild-2020]): the paper's sketch shape by default, Algorithm 1's error accumulation
(η_s on the momentum sketch; zeroing or linear removal), and the true / local top-k ablations."""

import json
from pathlib import Path

import pytest
import torch

from fl_sim.wire import keys
from fl_sim.config import config_from_dict, load_config
from fl_sim.wire.records import flatten_arrays, payload_from_records

ROOT = Path(__file__).resolve().parents[1]
K = 4


def _cfg(strategy, **over):
    raw = {"rounds": 2, "clients": 12, "clients_per_round": K, "data": {"name": "synthetic", "partition": "natural"},
           "model": {"name": "mlp", "hidden": [16]}, "train": {"lr": 0.05, "batch_size": 16},
           "strategy": {"name": "fetchsgd", **strategy}}
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


def _rounds(cfg, n):
    """Drive n rounds by hand; per round (payloads, weights, applied update, strategy state copies)."""
    from flwr.app import ConfigRecord

    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.testing import InMemoryGrid

    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    arrays, out = exp.initial_arrays, []
    for rnd in range(1, n + 1):
        before = (None if strategy.s_e is None else strategy.s_e.clone(),
                  None if strategy.s_u is None else strategy.s_u.clone())
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = sorted(grid.send_and_receive(msgs), key=lambda r: int(r.content[keys.METRICS][keys.M_CID]))
        payloads = [payload_from_records(r.content[keys.ARRAYS], r.content[keys.PAYLOAD_META]) for r in replies]
        n_ex = torch.tensor([float(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies], dtype=torch.float64)
        new, metrics = strategy.aggregate_train(rnd, replies)
        out.append({"payloads": payloads, "weights": n_ex / n_ex.sum(), "before": before, "metrics": dict(strategy.last_metrics),
                    "update": flatten_arrays(new) - flatten_arrays(arrays)})
        arrays = new
    return strategy, out


def test_default_configs_use_the_papers_sketch_shape():
    for name in ("fetchsgd", "cs_ef"):
        s = load_config(ROOT / "fl_sim" / "configs" / f"{name}.yaml").strategy.options
        assert s["rows"] == 5 and s["k"] <= s["rows"] * s["cols"] // 5, (name, s)  # k well below the cells
    from fl_sim.strategies import FetchSGD

    f = FetchSGD()  # README's row: rows=5, compression=10, k_ratio=0.02, momentum=0.9
    d = 61_706
    p = f.codec_params_for(d)
    assert f.rows == 5 and f.rho == 0.9 and f.compression == 10 and f.k_ratio == 0.02
    assert p["cols"] == round(d / 50) and p["k"] == round(0.02 * d) <= p["rows"] * p["cols"] // 5
    explicit = FetchSGD(cols=100, k=7)
    assert explicit.codec_params_for(d) == {"rows": 5, "cols": 100, "k": 7}
    with pytest.raises(ValueError, match="give one"):
        FetchSGD(cols=100, compression=10)


@pytest.mark.parametrize("removal", ["zero", "subtract"])
def test_sketch_error_accumulation_follows_algorithm_1(removal):
    # Round 1 from zero state: S_u = S^t, S_e = η_s S_u; Δ = Top-k(U(S_e)); S_u zeroed at nz(Δ)'s buckets;
    # S_e zeroed there ("zero") or S_e - S(Δ) ("subtract"). Round 2: S_u = ρ S_u + S^t, S_e += η_s S_u.
    eta, rho = 0.5, 0.9
    strategy, rounds = _rounds(_cfg({"rows": 3, "cols": 64, "k": 20, "momentum": rho, "error_removal": removal,
                                     "server_lr": eta}), 2)
    codec = strategy.codec_for(strategy._global_vector.numel())
    cs = codec.sketcher(strategy.sketch_seed)
    s_u = torch.zeros(3, 64)
    s_e = torch.zeros(3, 64)
    for r in rounds:
        s_t = codec.aggregate(r["payloads"], r["weights"].tolist()).tensors["table"]
        s_u = rho * s_u + s_t
        s_e = s_e + eta * s_u
        delta, idx = cs.unsketch_topk(s_e, 20)
        torch.testing.assert_close(r["update"], delta, rtol=1e-5, atol=1e-7)
        cs.zero_coordinates(s_u, idx)
        if removal == "subtract":
            s_e = s_e - cs.sketch(delta)
        else:
            cs.zero_coordinates(s_e, idx)
    torch.testing.assert_close(strategy.s_u, s_u, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(strategy.s_e, s_e, rtol=1e-5, atol=1e-7)


def test_true_topk_keeps_dense_momentum_and_error_at_the_server():
    eta, rho, k = 0.5, 0.9, 30
    strategy, rounds = _rounds(_cfg({"mode": "true_topk", "k": k, "momentum": rho, "server_lr": eta}), 2)
    d = strategy._global_vector.numel()
    u = torch.zeros(d)
    e = torch.zeros(d)
    for r in rounds:
        assert r["metrics"]["uplink_bits"] == K * 32 * d  # uncompressed upload
        g = torch.stack([p.tensors[next(iter(p.tensors))].reshape(-1).float() for p in r["payloads"]])
        u = rho * u + r["weights"].float() @ g
        e = e + eta * u
        idx = torch.topk(e.abs(), k).indices
        delta = torch.zeros(d)
        delta[idx] = e[idx]
        e[idx] = 0
        u[idx] = 0
        torch.testing.assert_close(r["update"], delta, rtol=1e-5, atol=1e-7)
    assert strategy.s_e.shape == (d,)
    torch.testing.assert_close(strategy.s_e, e, rtol=1e-5, atol=1e-7)


def test_local_topk_sends_client_topk_with_error_feedback_and_global_momentum():
    eta, rho, k = 0.5, 0.9, 25
    strategy, rounds = _rounds(_cfg({"mode": "local_topk", "k": k, "momentum": rho, "server_lr": eta}), 2)
    d = strategy._global_vector.numel()
    assert strategy.error_feedback == "classic" and strategy.codec_name == "topk"
    codec = strategy.codec_for(d)
    u = torch.zeros(d)
    for r in rounds:
        assert r["metrics"]["uplink_bits"] == sum(p.bits for p in r["payloads"])
        dec = torch.stack([codec.decode(p, seed=0) for p in r["payloads"]])
        u = rho * u + r["weights"].float() @ dec
        torch.testing.assert_close(r["update"], eta * u, rtol=1e-5, atol=1e-7)


def test_bad_mode_is_a_config_error():
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.config import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        build_strategy(build_experiment(_cfg({"mode": "sketchy"})))
