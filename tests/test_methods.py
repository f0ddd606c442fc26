"""Every method strategy end to end for a few rounds (in memory, real ClientApp + mods), with the
uplink bits checked exactly against each codec's documented formula."""

import json
import math

import pytest
import torch

from fl_sim.config import config_from_dict
from fl_sim.testing import run_in_memory

K = 4  # clients per round


def cfg_for(strategy: dict, codec: dict | None = None, **over):
    raw = {
        "rounds": 3,
        "clients": 12,
        "clients_per_round": K,
        "data": {"name": "synthetic", "partition": "natural"},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"lr": 0.05, "batch_size": 16},
        "strategy": strategy,
    }
    if codec:
        raw["codec"] = codec
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


def d_of(strategy_obj) -> int:
    return strategy_obj._global_vector.numel()


def rows_after(cfg):
    _, rows, strat = run_in_memory(cfg)
    assert len(rows) == cfg.rounds + 1
    for r in rows:
        assert math.isfinite(r["test_accuracy"])
    return rows[1:], strat


def test_identity_codec_equals_fedavg():
    plain, _ = rows_after(cfg_for({"name": "fedavg"}))
    coded, _ = rows_after(cfg_for({"name": "compressed"}, {"name": "identity"}))
    assert [r["test_accuracy"] for r in plain] == pytest.approx([r["test_accuracy"] for r in coded], abs=1e-6)
    assert [r["uplink_bits"] for r in plain] == [r["uplink_bits"] for r in coded]


def test_topk_ef_bits():
    rows, s = rows_after(cfg_for({"name": "compressed", "error_feedback": "classic"},
                                 {"name": "topk", "k": 50, "index_coding": "fixed"}))
    d = d_of(s)
    per_client = 50 * 32 + 8 * math.ceil(50 * math.ceil(math.log2(d)) / 8)  # packed indices, byte-padded
    assert all(r["uplink_bits"] == K * per_client for r in rows)


def test_fihtcs_bits_and_server_state():
    rows, s = rows_after(cfg_for({"name": "fiht_cs", "compression": 4}))
    d = d_of(s)
    q = round(d / 4)
    assert all(r["uplink_bits"] == K * 32 * q for r in rows)
    assert s.residual is not None and s.residual.shape == (q,)
    assert all(0 <= r["recovery_residual"] <= 1.0 + 1e-6 for r in rows)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_fetchsgd_bits_and_sketch_state(momentum):
    rows, s = rows_after(cfg_for({"name": "fetchsgd", "rows": 3, "cols": 64, "k": 40, "momentum": momentum}))
    assert all(r["uplink_bits"] == K * 32 * 3 * 64 for r in rows)
    assert all(r["update_nnz"] <= 40 for r in rows)
    assert s.s_e.shape == (3, 64)


@pytest.mark.parametrize("granularity", ["tensor", "vector"])
def test_qcs_bits(granularity):
    rows, s = rows_after(cfg_for({"name": "qcs", "block": 64, "k": 16, "levels": 2, "granularity": granularity}))
    d = d_of(s)
    if granularity == "tensor":  # each tensor padded to whole blocks of 64 on its own
        lengths = [p.numel() for p in torch.nn.Linear(60, 32).parameters()] + [32 * 10, 10]
        assert s.codec_params_for(d)["segments"] == lengths and sum(lengths) == d
        blocks = sum(math.ceil(n / 64) for n in lengths)
        assert blocks > math.ceil(d / 64)
    else:
        blocks = math.ceil(d / 64)
    per_client = blocks * 32 + 8 * math.ceil(blocks * 16 * math.ceil(math.log2(2 * 2 + 1)) / 8)  # packed levels
    assert all(r["uplink_bits"] == K * per_client for r in rows)


@pytest.mark.parametrize("phi", ["per_worker", "common"])
def test_onebit_cs(phi):
    rows, s = rows_after(cfg_for({"name": "onebit_cs", "compression": 2, "phi": phi}))
    d = d_of(s)
    m = round(d / 2)
    assert all(r["uplink_bits"] == K * (8 * math.ceil(m / 8) + 32) for r in rows)  # 8 bits a byte, rho float32


def test_daqusgd_bits_and_threshold():
    rows, s = rows_after(cfg_for({"name": "daqusgd", "bits_per_feature": 3, "epoch_rounds": 1}, rounds=4))
    dim = 60  # synthetic features
    label_bits = math.ceil(math.log2(10))
    for r in rows:
        n = r["received_samples"]
        # per reply on the wire: an int32 header [n, C, 60], the float32 scale, and at most 7 padding bits in
        # each of the two packed arrays (levels, labels)
        assert r["uplink_bits"] <= K * (96 + 32 + 2 * 7) + n * (dim * 3 + label_bits)
        assert r["uplink_bits"] >= K * (96 + 32) + n * (dim * 3 + label_bits)
    assert rows[0]["threshold"] == 0.0 and rows[1]["threshold"] > 0.0


def test_rlc_channel_uses_and_decode():
    rows, s = rows_after(cfg_for({"name": "rlc", "gain": 4}, channel={"snr_db": 18.0, "fading": "rayleigh"}))
    d = d_of(s)
    m = round(d / 4)
    assert all(r["channel_uses"] == m for r in rows)
    assert all(r["rlc_channel_rel_mse"] < 1.0 for r in rows)


def test_digital_baseline_channel_uses():
    rows, s = rows_after(cfg_for({"name": "compressed"}, {"name": "topk", "k": 20, "index_coding": "fixed"},
                                 channel={"snr_db": 18.0}))
    c = 0.5 * math.log2(1 + 10 ** 1.8)
    d = d_of(s)
    per_client = 20 * 32 + 8 * math.ceil(20 * math.ceil(math.log2(d)) / 8)  # the bytes sent
    assert all(r["channel_uses"] == K * math.ceil(per_client / c) for r in rows)


def test_malformed_payload_rejected(caplog):
    from flwr.app import Array

    from fl_sim.wire import keys
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.runs.simulation import server_loop
    from fl_sim.testing import InMemoryGrid

    cfg = cfg_for({"name": "fiht_cs", "compression": 4}, rounds=2)
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    victims = []

    def tamper(reply):
        arrays = reply.content[keys.ARRAYS]
        if not victims:
            name = next(iter(arrays.keys()))
            nd = arrays[name].numpy().copy()
            nd = nd.astype("float32")
            nd[0] = float("nan")
            arrays[name] = Array(nd)
            victims.append(reply.metadata.src_node_id)
        return reply

    grid.tamper = tamper
    rows = []
    with caplog.at_level("ERROR", logger="fl_sim"):
        server_loop(grid, exp, strategy, None, lambda r, row: rows.append(row))
    assert rows[1]["clients_failed"] == 1 and rows[1]["clients_ok"] == K - 1
    assert all(torch.isfinite(torch.tensor(r["test_accuracy"])) for r in rows)
    assert any(str(victims[0]) in rec.getMessage() for rec in caplog.records)


def test_daqusgd_client_sends_nothing_above_an_impossible_threshold():
    from fl_sim.clients.daqusgd import select_and_quantize
    from fl_sim.models import build_model

    model = build_model("mlp", (6,), 3, hidden=[4])
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    sel = select_and_quantize(model, x, y, threshold=1e9, bits_per_feature=3, num_classes=3, batch_size=8,
                              generator=torch.Generator().manual_seed(0))
    assert sel.bits == 0 and sel.labels.numel() == 0 and sel.levels.shape == (0, 6)
    sel = select_and_quantize(model, x, y, threshold=-1.0, bits_per_feature=3, num_classes=3, batch_size=8,
                              generator=torch.Generator().manual_seed(0))
    assert sel.bits == 32 + 8 * (6 * 3 + 2)
