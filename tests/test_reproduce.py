"""fl-sim reproduce: spec loading, the codec-level [Abdi-thesis] Ch. 4 experiment on a tiny grid (its numbers
checked against Theorem 7, Lemma 8, Lemma 9 and the exact rand-k variance), and the generic 'runs'
kind on a 2-round in-process config (report, Pareto figure, resume)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fl_sim.cli import app
from fl_sim.experiments.reproduce import (
    best_qcs_parameters,
    codec_block_errors,
    list_experiments,
    load_spec,
    merged_settings,
    qcs_theory_front,
    reproduce,
)

REPO = Path(__file__).resolve().parent.parent


def test_every_paper_config_loads_and_full_merges_over_reduced():
    names = {n for n, _, _ in list_experiments()}
    assert {"qcs_mse", "qcs_accuracy", "pareto", "onebit_cs", "tang_fiht", "tang_fiht_noniid", "fetchsgd", "daqusgd",
            "rlc"} <= names
    spec = load_spec("qcs_mse")
    red, full = merged_settings(spec, False), merged_settings(spec, True)
    assert red["blocks"] < full["blocks"] and full["block"] == red["block"] == 256  # untouched keys kept
    spec = load_spec("qcs_accuracy")
    red, full = merged_settings(spec, False)["set"], merged_settings(spec, True)["set"]
    assert full[: len(red)] == red and "rounds=2000" in full[len(red):]  # 'set' lists append: full wins


def test_every_runs_experiment_config_validates_reduced_and_full():
    # Every run of every 'runs' experiment must be a valid fl-sim config with its overrides (a typo in a
    # paper YAML would otherwise surface only minutes into a reproduction).
    from fl_sim.config import load_config
    from fl_sim.experiments.reproduce.runner import _resolve_config

    for name, kind, _ in list_experiments():
        if kind != "runs":
            continue
        spec = load_spec(name)
        for full in (False, True):
            sets = merged_settings(spec, full).get("set", [])
            for e in spec["runs"]:
                e = {"config": e} if isinstance(e, str) else e
                load_config(_resolve_config(e["config"], Path(spec["_path"])), [*sets, *e.get("set", [])])


def test_unknown_experiment_and_bad_kind_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="qcs_mse"):
        load_spec("no_such_experiment")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: nope\n")
    with pytest.raises(ValueError, match="kind='nope'"):
        load_spec(bad)


def test_best_parameters_match_notes_table():
    # docs/notes.md#qcs-numbers: best (k, Q) for gain ~ 32 at n = 256 is k = 110, Q = 2, gamma = 2.017; gain 100: k = 35, Q = 2, 7.99.
    b = best_qcs_parameters(256, 32)
    assert (b["k"], b["levels"], round(b["gamma"], 3)) == (110, 2, 2.017)
    b = best_qcs_parameters(256, 100)
    assert (b["k"], b["levels"], round(b["gamma"], 2)) == (35, 2, 7.99)
    # with the codec's exact bits (fixed-length indices + a 32-bit scale) 7 levels fill 3 bits better than 5
    w = best_qcs_parameters(256, 32, levels=[0.5, 1, 2, 3, 4], wire=True)
    assert (w["k"], w["levels"]) == (74, 3) and 32 + 74 * 3 <= 256
    front = qcs_theory_front(256, [1, 2])
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in zip(front, front[1:]))  # gain down, gamma down


def test_block_errors_randk_variance_and_qcs_bits():
    # Unbiased rand-k on a block: ||g_hat - g||^2 / ||g||^2 has mean n/k - 1 exactly (per block, any g).
    # Per-block sd for Gaussian g is about (n/k) sqrt(k/n) * sqrt(2) ~ 3.3 at n=64, k=8; with 160 blocks
    # SE ~ 0.26, so 5 SE ~ 1.3 around 7 (a missing d/k rescaling would give 1 - k/n = 0.875).
    n, k, B = 64, 8, 160
    G = torch.randn(B, n, generator=torch.Generator().manual_seed(1))
    _, err, bits = codec_block_errors("randk", {"k": k, "unbiased": True}, G, seed=3)
    se = float(err.std()) / math.sqrt(B)
    assert abs(float(err.mean()) - (n / k - 1)) < 5 * se, (float(err.mean()), se)
    assert bits == 32 * k
    _, err, bits = codec_block_errors("qcs", {"k": 20, "levels": 3}, G, seed=3)
    assert bits == 32 + 20 * 3 and err.shape == (B,)


TINY = {
    "name": "tiny_qcs",
    "kind": "qcs_codec",
    "seed": 0,
    "reduced": {
        "block": 64, "blocks": 48, "ks": [8, 32, 64], "levels": [0.5, 2], "qsgd_levels": [1, 4], "topk": [4],
        "randk": [8], "theorem_ks": [8, 32], "theorem_levels": [1, 4], "unbiased_k": 16, "unbiased_levels": [1],
        "unbiased_repeats": 16, "unbiased_blocks": 16, "ef_k": 32, "ef_levels": 2, "ef_blocks": 32, "ef_steps": 24,
        "ef_betas": ["optimal", 1.0], "ef_betas_mmse": [1.0], "ef_cap": 20,
    },
}


def test_qcs_codec_experiment_tiny(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    s = reproduce(spec, out=tmp_path / "out")
    out = tmp_path / "out"
    for f in ("gain_mse", "theorem7", "weighted_ef"):
        assert (out / f"{f}.csv").is_file() and (out / f"{f}.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["experiment"] == "tiny_qcs"
    for r in s["theorem7"]:
        # Theorem 7: E||e||^2 <= gamma ||g||^2 (measured + 5 SE), Lemma 8: MMSE <= gamma/(gamma+1) (+ 5 SE)
        assert r["unbiased_mse"] <= r["gamma"] + 5 * r["unbiased_se"]
        assert r["mmse_mse"] <= r["mmse_bound"] + 5 * r["mmse_se"] and r["mmse_mse"] < 1
    for r in s["unbiasedness"]:
        # ratio = S * mean_b ||mean of S decodes - g_b||^2/||g_b||^2 / mse: mean 1 for an unbiased codec. Each
        # block's term is noise with ~k = 16 degrees of freedom (relative sd ~ sqrt(2/16) = 0.35), averaged over
        # 16 blocks: sd ~ 0.09, so (0.6, 1.5) is > 4 sd. A bias of b ||g|| adds S b^2 / mse (S = 16, mse ~ 5):
        # the 1-bit erratum's factor 2 (b = 1) would add ~3; b = 0.4 already ~0.5.
        assert 0.6 < r["ratio"] < 1.5, r
    ef = {(e["alpha"], e["beta"]): e for e in s["ef"]}
    classic = ef[("unbiased", 1.0)]
    # k=32 of n=64, Q=2: measured gamma ~ 1.2 > 1, so beta = 1 grows by ~gamma per step and diverges.
    assert s["ef_gamma_emp"] > 1 and classic["diverged"] and classic["growth_per_step"] > 1
    for key, e in ef.items():
        if key == ("unbiased", 1.0):
            continue
        assert not e["diverged"] and e["steady_over_B"] <= e["lemma9_eta"]  # Lemma 9 (4.15) / (4.16)
        # The recursion with the measured gamma predicts E||r_t||^2/B; tail mean of 12 steps, d = 2048:
        # per-step relative sd ~ sqrt(2 / (32 blocks * 32 rows)) ~ 4%, gamma estimated from 64 blocks (~3%,
        # amplified ~1.5x by the fixed point): 20% is > 4 sd.
        assert e["steady_over_B"] == pytest.approx(e["predicted_tail"], rel=0.2), e


TINY_RUN = {
    "seed": 0, "rounds": 2, "clients": 6, "clients_per_round": 3, "eval_every": 1,
    "data": {"name": "synthetic", "partition": "natural"}, "model": {"name": "mlp", "hidden": [8]},
    "train": {"lr": 0.05, "batch_size": 16}, "strategy": {"name": "fedavg"},
}


def test_runs_kind_reports_pareto_and_resumes(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_RUN))
    spec = {
        "name": "tiny_runs", "kind": "runs", "title": "tiny",
        "runs": [{"config": str(tmp_path / "base.yaml"), "name": "fedavg"},
                 {"config": str(tmp_path / "base.yaml"), "name": "qsgd",
                  "set": ["strategy.name=compressed", "codec.name=qsgd", "codec.levels=2"]}],
        "reduced": {"baseline": "fedavg", "set": ["rounds=2"]},
        "full": {"set": ["rounds=3"]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    s = reproduce(tmp_path / "spec.yaml", out=tmp_path / "out")
    out = tmp_path / "out"
    for f in ("pareto.png", "accuracy_vs_uplink_bits.png", "report.csv", "summary.json"):
        assert (out / f).is_file(), f
    by = {r["run"]: r for r in s["runs"]}
    assert set(by) == {"fedavg", "qsgd"} and by["qsgd"]["uplink_bits"] < by["fedavg"]["uplink_bits"] / 5
    saved = yaml.safe_load((out / "runs" / "qsgd" / "config.yaml").read_text())
    assert saved["simulation"]["backend"] == "vectorized"
    # the papers have no relative reply guards: off in a reproduction (reproduce.HONEST_CLIENTS)
    guards = saved["strategy"]["guards"]
    assert guards["norm_bound"] is None and guards["scalar_bound"] is None and guards["weight_cap"] is None
    calls = []
    reproduce(tmp_path / "spec.yaml", out=tmp_path / "out", runner=lambda cfg, d: calls.append(d))
    assert calls == []  # finished runs with the same config are not rerun
    # a run made with another backend (engine keys: the same numbers) is not rerun either
    cfg_file = out / "runs" / "qsgd" / "config.yaml"
    saved = yaml.safe_load(cfg_file.read_text())
    saved["simulation"]["backend"] = "inline"
    cfg_file.write_text(yaml.safe_dump(saved))
    reproduce(tmp_path / "spec.yaml", out=tmp_path / "out", runner=lambda cfg, d: calls.append(d))
    assert calls == []
    spec["runs"][1]["name"] = "fedavg"
    (tmp_path / "dup.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="two runs are named 'fedavg'"):
        reproduce(tmp_path / "dup.yaml", out=tmp_path / "dup")


def test_cli_list_and_unknown_name(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["reproduce", "--list"])
    assert res.exit_code == 0 and "qcs_mse" in res.output
    res = runner.invoke(app, ["reproduce", "no_such_experiment", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "no experiment" in res.output


def test_runs_kind_cumulative_channel_uses_and_sparsity_plot(tmp_path):
    # A FedAvg run with a digital channel section counts sum_i ceil(bits_i / C) channel uses per round;
    # 'cumulative' sums them into report.csv and a plot; 'metric_plots' draws update_sparsity vs round.
    from fl_sim.channels.accounting import digital_channel_uses
    from fl_sim.runs.results import load_run

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_RUN))
    spec = {
        "name": "tiny_channel", "kind": "runs",
        "runs": [{"config": str(tmp_path / "base.yaml"), "name": "fedavg"},
                 {"config": str(tmp_path / "base.yaml"), "name": "digital", "set": ["channel.snr_db=18"]}],
        "reduced": {"baseline": "fedavg", "cumulative": ["channel_uses"],
                    "metric_plots": [{"column": "update_sparsity", "runs": ["fedavg"], "reference": 0.05,
                                      "reference_label": "K/d"}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    s = reproduce(tmp_path / "spec.yaml", out=tmp_path / "out")
    out = tmp_path / "out"
    for f in ("accuracy_vs_channel_uses.png", "update_sparsity_vs_round.png"):
        assert (out / f).is_file(), f
    by = {r["run"]: r for r in s["runs"]}
    assert by["fedavg"]["total_channel_uses"] is None  # no channel section: no channel uses
    _, rows = load_run(out / "runs" / "digital")
    d_bits = rows[1]["uplink_bits"] / TINY_RUN["clients_per_round"]  # every client sends 32 d bits
    per_round = digital_channel_uses([int(d_bits)] * TINY_RUN["clients_per_round"], 18.0)
    assert by["digital"]["total_channel_uses"] == per_round * TINY_RUN["rounds"]
    sp = s["update_sparsity"]["fedavg"]
    assert 0 < sp["min"] <= sp["max"] <= 1  # sp(g) lies in [1/d, 1]
    spec["reduced"]["metric_plots"][0]["runs"] = ["nope"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="nope"):
        reproduce(tmp_path / "bad.yaml", out=tmp_path / "out")
