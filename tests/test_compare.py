"""fl-sim compare: the validation split, the suite spec, tuning choice on validation data only,
aggregation on fabricated run directories against hand-computed numbers, resume by config hash, and a
tiny smoke run of the command."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fl_sim.cli import app
from fl_sim.experiments.compare import (
    DONE_FILE,
    PlannedRun,
    aggregate,
    choose,
    bits_to_held,
    held_from,

    config_hash,
    execute_plan,
    load_suite,
    plan_tuning,
    write_outputs,
)
from fl_sim.config import ConfigError, load_config
from fl_sim.runs.simulation import eval_due
from fl_sim.experiments.compare.bracket import AT_CAP, BRACKETED, EXTENDING, bracket
from fl_sim.data import load_federated
from fl_sim.data.sources import load_source
from fl_sim.data.validation import hold_out_validation

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "fl_sim" / "configs" / "compare" / "suite.yaml"


# --------------------------------------------------------------------------------------------- helpers
def fabricate(run_dir: Path, accs, bits, *, val=None, val_loss=None, name="r", down=None) -> Path:
    """A run directory: metrics.csv rows for rounds 0..len(accs)-1 (acc None = not evaluated that round),
    uplink bits per round (round 0 sends nothing), downlink bits per round (``down``, default = uplink),
    and summary.json as RunRecorder.finish writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    down = bits if down is None else down
    lines = ["round,train_loss,test_loss,test_accuracy,uplink_bits,downlink_bits,wall_s,val_loss,val_accuracy"]
    for rnd, acc in enumerate(accs):
        b, dn = (0, 0) if rnd == 0 else (bits, down)
        v = "" if val is None or val[rnd] is None else val[rnd]
        vl = "" if v == "" else (1.0 if val_loss is None else val_loss[rnd])
        lines.append(f"{rnd},,{'' if acc is None else 1.0},{'' if acc is None else acc},{b},{dn},0.1,{vl},{v}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    final = [a for a in accs if a is not None][-1]
    (run_dir / "summary.json").write_text(json.dumps({
        "name": name, "rounds": len(accs) - 1, "final_test_accuracy": final,
        "total_uplink_bits": bits * (len(accs) - 1), "total_downlink_bits": down * (len(accs) - 1),
        "total_bits": (bits + down) * (len(accs) - 1)}))
    return run_dir


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregate_hand_computed(tmp_path):
    """Two seeds of FedAvg and of a compressed method m; every figure below is computed by hand.

    FedAvg finals 0.8 and 1.0 -> mean 0.9 -> target 0.9 x 0.9 = 0.81. A run reaches the target only when
    its accuracy stays >= 0.81 from one evaluation to the end; bits are counted to the start of that stretch.
    FedAvg s1 0.5, 0.8, 0.8 never reaches it; s2 holds it from round 2 -> 200 uplink, 200 downlink bits.
    m s1 touches it at round 1 (0.82), falls back (0.7) and holds it from round 3 (0.83) -> 30 uplink bits
    (the first-touch rule said 10); m s2 is not evaluated at round 2 (its bits still count) and holds it
    from round 3 -> 30. m downloads 100 bits a round: 300 downlink, 330 total bits to target.
    n touches the target at round 1 and ends below it: not reached. Savings are paired by seed: s1 has
    no FedAvg figure; s2 uplink 200/30, downlink 200/300, total 400/330.
    95% t-interval of m's final accuracy (0.83, 0.85): s = 0.01 sqrt(2), t_{0.975,1} = 12.7062,
    half-width = 12.7062 x 0.01 sqrt(2) / sqrt(2) = 0.127062.
    """
    runs = [
        {"task": "t", "method": "fedavg", "seed": 1, "run_dir": fabricate(tmp_path / "f1", [0.1, 0.5, 0.8, 0.8], 100)},
        {"task": "t", "method": "fedavg", "seed": 2, "run_dir": fabricate(tmp_path / "f2", [0.1, 0.6, 0.9, 1.0], 100)},
        {"task": "t", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "m1", [0.1, 0.82, 0.7, 0.83], 10, down=100)},
        {"task": "t", "method": "m", "seed": 2, "run_dir": fabricate(tmp_path / "m2", [0.1, 0.3, None, 0.85], 10, down=100)},
        {"task": "t", "method": "n", "seed": 2, "run_dir": fabricate(tmp_path / "n2", [0.1, 0.9, 0.7], 10)},
        # a second task with its own baseline and target: 0.9 x 0.5 = 0.45, reached by its m at round 2
        {"task": "u", "method": "fedavg", "seed": 1, "run_dir": fabricate(tmp_path / "u1", [0.1, 0.3, 0.5], 50)},
        {"task": "u", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "u2", [0.1, 0.2, 0.46], 5)},
    ]
    run_rows, summary, targets = aggregate(runs, baseline="fedavg", target_fraction=0.9, root=tmp_path)
    assert targets["t"] == pytest.approx(0.81)
    assert targets["u"] == pytest.approx(0.45)
    by = {(r["task"], r["method"], r["seed"]): r for r in run_rows}
    assert by["t", "fedavg", 1]["uplink_bits_to_target"] is None and by["t", "fedavg", 1]["held_from_round"] is None
    assert by["t", "fedavg", 2]["uplink_bits_to_target"] == 200 and by["t", "fedavg", 2]["held_from_round"] == 2
    assert by["t", "m", 1]["uplink_bits_to_target"] == 30 and by["t", "m", 1]["held_from_round"] == 3
    assert by["t", "m", 2]["uplink_bits_to_target"] == 30
    assert (by["t", "m", 2]["downlink_bits_to_target"], by["t", "m", 2]["total_bits_to_target"]) == (300, 330)
    assert by["t", "n", 2]["uplink_bits_to_target"] is None and by["t", "n", 2]["uplink_savings"] is None
    assert by["t", "m", 1]["uplink_savings"] is None
    assert by["t", "m", 2]["uplink_savings"] == pytest.approx(200 / 30)
    assert by["t", "m", 2]["downlink_savings"] == pytest.approx(200 / 300)
    assert by["t", "m", 2]["total_savings"] == pytest.approx(400 / 330)
    assert by["t", "m", 2]["total_downlink_bits"] == 300 and by["t", "m", 2]["total_bits"] == 330
    assert by["u", "m", 1]["uplink_bits_to_target"] == 10 and by["u", "fedavg", 1]["uplink_bits_to_target"] == 100
    assert by["t", "m", 1]["run_dir"] == "m1"  # relative to the output directory
    s = {(r["task"], r["method"]): r for r in summary}
    f, m = s["t", "fedavg"], s["t", "m"]
    assert (f["final_accuracy_mean"], f["final_accuracy_min"], f["final_accuracy_max"]) == pytest.approx((0.9, 0.8, 1.0))
    assert (f["uplink_bits_to_target_mean"], f["reached"], f["seeds"]) == (200, 1, 2)
    assert f["uplink_bits_to_target_ci95"] is None  # one seed held it: no interval
    assert (m["final_accuracy_mean"], m["final_accuracy_min"], m["final_accuracy_max"]) == pytest.approx((0.84, 0.83, 0.85))
    assert m["final_accuracy_ci95"] == pytest.approx(0.127062, rel=1e-4)
    assert (m["total_uplink_bits_mean"], m["total_uplink_bits_min"], m["total_uplink_bits_max"]) == (30, 30, 30)
    assert m["total_uplink_bits_ci95"] == 0.0
    assert (m["uplink_bits_to_target_mean"], m["uplink_bits_to_target_min"], m["uplink_bits_to_target_max"]) == (30, 30, 30)
    assert m["reached"] == 2 and s["t", "n"]["reached"] == 0
    assert (m["uplink_savings_mean"], m["uplink_savings_min"], m["uplink_savings_max"]) == pytest.approx((200 / 30,) * 3)
    assert s["u", "m"]["uplink_savings_mean"] == pytest.approx(10.0)


def test_held_rule_counts_bits_to_the_start_of_the_held_stretch():
    """Rounds not evaluated (None, or NaN as load_run reads a blank cell) neither start nor break a stretch;
    an evaluation with a non-finite test loss (diverged: its argmax accuracy means nothing) breaks it."""
    nan = float("nan")
    rows = [{"round": i, "test_accuracy": a, "test_loss": l, "uplink_bits": 0 if i == 0 else 7}
            for i, (a, l) in enumerate([(0.0, 1.0), (0.9, 1.0), (0.95, nan), (0.9, 1.0), (None, None), (nan, nan), (0.95, 1.0)])]
    assert held_from(rows, 0.9) == 3 and bits_to_held(rows, 0.9) == 21
    assert held_from(rows, 0.96) is None and bits_to_held(rows, 0.96) is None
    assert held_from(rows[:2], 0.9) == 1


def test_eval_tail_evaluates_every_round_at_the_end():
    cfg = load_config("quickstart", ["rounds=100", "eval_every=5", "eval_tail=0.2"])
    due = [r for r in range(101) if eval_due(r, cfg)]
    assert due == [0, *range(5, 80, 5), *range(80, 101)]  # rounds 81..100 (the last 20) every round
    assert [r for r in range(11) if eval_due(r, load_config("quickstart", ["rounds=10", "eval_every=0"]))] == [0, 10]
    with pytest.raises(ConfigError, match="eval_tail"):
        load_config("quickstart", ["eval_tail=1.5"])


def test_aggregate_needs_the_baseline(tmp_path):
    runs = [{"task": "t", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "m", [0.1, 0.5], 1)}]
    with pytest.raises(ValueError, match="baseline"):
        aggregate(runs, baseline="fedavg")


def test_runs_csv_columns_and_blank_when_not_reached(tmp_path):
    runs = [
        {"task": "t", "method": "fedavg", "seed": 1, "run_dir": fabricate(tmp_path / "f", [0.1, 0.9], 100)},
        {"task": "t", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "m", [0.1, 0.2], 10)},
    ]
    run_rows, summary, targets = aggregate(runs)
    suite = load_suite(SUITE)
    write_outputs(suite, tmp_path / "docs", run_rows, summary, targets, [], {})
    import csv

    rows = list(csv.DictReader((tmp_path / "docs" / "runs.csv").open()))
    for col in ("task", "method", "seed", "final_accuracy", "total_uplink_bits", "total_downlink_bits", "total_bits",
                "uplink_bits_to_target", "downlink_bits_to_target", "total_bits_to_target", "uplink_savings",
                "downlink_savings", "total_savings", "held_from_round"):
        assert col in rows[0]
    assert rows[0]["uplink_bits_to_target"] == "100" and rows[1]["uplink_bits_to_target"] == ""
    assert rows[0]["total_bits_to_target"] == "200"
    assert (tmp_path / "docs" / "pareto.png").stat().st_size > 1000
    assert "not reached (0/1)" in (tmp_path / "docs" / "summary.md").read_text()


# --------------------------------------------------------------------------------------------- tuning
def _planned(tmp_path, name, point, **kw) -> PlannedRun:
    d = fabricate(tmp_path / name, **kw)
    return PlannedRun("t", "m", 0, point, None, d, "tune")


def test_choice_reads_validation_never_test(tmp_path):
    """Point a has the best test accuracy, b the best validation score: b must be chosen. The score is the
    mean of the last 3 evaluated val_accuracy values (rounds 2-4; round 3 not evaluated -> rounds 1, 2, 4)."""
    a = _planned(tmp_path, "a", (("lr", 1),), accs=[0.1, 0.9, 0.95, None, 0.99], bits=1, val=[0.1, 0.5, 0.5, None, 0.5])
    b = _planned(tmp_path, "b", (("lr", 2),), accs=[0.1, 0.2, 0.2, None, 0.2], bits=1, val=[0.1, 0.6, 0.7, None, 0.8])
    c = _planned(tmp_path, "c", (("lr", 4),), accs=[0.1, 0.2, 0.2, None, 0.2], bits=1, val=[0.1, 0.6, 0.7, None, 0.8])
    choices, rows = choose([a, b, c], window=3)
    assert choices[("t", "m")] == (("lr", 2),)  # c ties with b: the first listed wins
    scores = {r["point"]: r["val_score"] for r in rows}
    assert scores["lr=1"] == pytest.approx(0.5) and scores["lr=2"] == pytest.approx(0.7)
    assert [r["chosen"] for r in rows] == [False, True, False]


def test_diverged_tuning_run_scores_zero(tmp_path):
    """A diverged model has NaN loss but still an accuracy (argmax of NaN logits): it must not win."""
    a = _planned(tmp_path, "a", (("lr", 1),), accs=[0.1, 0.3], bits=1, val=[0.1, 0.3])
    b = _planned(tmp_path, "b", (("lr", 2),), accs=[0.1, 0.5], bits=1, val=[0.1, 0.5], val_loss=[1.0, float("nan")])
    choices, rows = choose([a, b], window=3)
    assert choices[("t", "m")] == (("lr", 1),)
    assert rows[1]["val_score"] == 0.0


def test_choice_without_validation_column_is_an_error(tmp_path):
    a = _planned(tmp_path, "a", (("lr", 1),), accs=[0.1, 0.3], bits=1)
    with pytest.raises(ValueError, match="data.validation"):
        choose([a], window=3)


# --------------------------------------------------------------------------------------------- bracketed tuning
def test_bracket_rule():
    """Interior best: bracketed. Edge best: add the next log-grid value beyond it, up to the cap."""
    assert bracket([(0.5, 0.6), (1.0, 0.7), (2.0, 0.65)], 1.0, 2.0, 0, 3) == (BRACKETED, [])
    assert bracket([(0.5, 0.6), (1.0, 0.7), (2.0, 0.8)], 2.0, 2.0, 0, 3) == (EXTENDING, [4.0])
    assert bracket([(0.5, 0.8), (1.0, 0.7), (2.0, 0.6)], 0.5, 2.0, 0, 3) == (EXTENDING, [0.25])
    assert bracket([(0.15, 0.1), (0.3, 0.2), (0.6, 0.3)], 0.6, 2.0, 0, 3) == (EXTENDING, [1.2])
    assert bracket([(0.5, 0.6), (1.0, 0.7), (2.0, 0.8)], 2.0, 2.0, 3, 3) == (AT_CAP, [])
    assert bracket([(1.0, 0.7)], 1.0, 2.0, 0, 1) == (EXTENDING, [0.5])  # one point: below first, cap allows one
    assert bracket([(8, 0.7), (16, 0.9)], 16, 2.0, 0, 2) == (EXTENDING, [32])  # an integer step stays an integer
    # a failed run (no score) bounds nothing; a diverged one (score 0) does
    assert bracket([(1.0, 0.7), (2.0, None), (0.5, 0.1)], 1.0, 2.0, 1, 3) == (AT_CAP, [])
    assert bracket([(1.0, 0.7), (2.0, 0.0), (0.5, 0.1)], 1.0, 2.0, 1, 3) == (BRACKETED, [])
    with pytest.raises(ValueError, match="factor"):
        bracket([(1.0, 0.7)], 1.0, 1.0, 0, 3)


def test_bracketed_tuning_extends_every_method_by_the_same_rule(tmp_path):
    """Fabricated validation scores peaking at a known step: score = 0.9 - 0.1 |log2(lr / peak)|, and a
    diverged run (NaN loss, score 0) from lr 16 on. Grids [0.5, 1, 2], factor 2, cap 3:
    fedavg (peak 4): 2 is on the edge -> 4 -> 8 (worse) -> bracketed at 4 after 2 added points (5 runs);
    qcs (peak 0.01): 0.5 on the edge -> 0.25 -> 0.125 -> 0.0625, at cap after 3 added points (6 runs);
    topk_ef (peak 1): interior from the start, bracketed with the grid's 3 runs."""
    import math

    from fl_sim.experiments.compare.runner import tune

    peak = {"fedavg": 4.0, "qcs": 0.01, "topk_ef": 1.0}
    suite = load_suite(_write_suite(tmp_path, bracket={"factor": 2, "cap": 3}))

    def fake(cfg_dict, run_dir, digest, version):
        lr, method = cfg_dict["strategy"]["server_lr"], Path(run_dir).parts[-3]
        score = 0.9 - 0.1 * abs(math.log2(lr / peak[method]))
        loss = float("nan") if lr >= 16 else 1.0
        d = fabricate(Path(run_dir), [0.1, 0.5], 1, val=[0.1, score], val_loss=[1.0, loss])
        (d / DONE_FILE).write_text(json.dumps({"config_hash": digest, "code_version": version}))

    plan, failures, info = tune(suite, ["dense"], list(peak), tmp_path / "runs", runner=fake)
    assert failures == []
    assert info["dense", "fedavg"] == {"bracket": "bracketed", "added": 2, "tuning_runs": 5}
    assert info["dense", "qcs"] == {"bracket": "at cap", "added": 3, "tuning_runs": 6}
    assert info["dense", "topk_ef"] == {"bracket": "bracketed", "added": 0, "tuning_runs": 3}
    choices, _ = choose(plan, suite.tuning_window)
    assert choices["dense", "fedavg"] == (("strategy.server_lr", 4.0),)
    assert choices["dense", "qcs"] == (("strategy.server_lr", 0.0625),)
    lrs = sorted(dict(r.point)["strategy.server_lr"] for r in plan if r.method == "qcs")
    assert lrs == [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
    # report-only: the added points already on disk are found again without running anything
    again, _, info2 = tune(suite, ["dense"], list(peak), tmp_path / "runs", report_only=True,
                           runner=lambda *a: pytest.fail("report_only ran a run"))
    assert info2 == info and len(again) == len(plan)


def test_bracket_settings_checked(tmp_path):
    with pytest.raises(ConfigError, match="bracket"):
        load_suite(_write_suite(tmp_path, bracket={"factor": 1.0, "cap": 2}))
    with pytest.raises(ConfigError, match="bracket"):
        load_suite(_write_suite(tmp_path, bracket={"factr": 2}))


# --------------------------------------------------------------------------------------------- suite spec
def test_suite_every_config_validates_with_equal_budget_and_distinct_tuning_seed(tmp_path):
    suite = load_suite(SUITE)
    assert suite.tuning_seed not in suite.seeds and len(suite.seeds) == 3
    assert set(suite.tasks) == {"dense", "image", "mnist1d"}
    plan = plan_tuning(suite, list(suite.tasks), [m.name for m in suite.methods], tmp_path)
    # every method's grid has `budget` points; the sketch methods run it for each of their 2 knob variants
    assert len(plan) == len(suite.tasks) * suite.budget * sum(max(1, len(m.knobs)) for m in suite.methods)
    assert {len(m.knobs) for m in suite.methods if m.name in ("cs_ef", "fetchsgd")} == {2}
    for r in plan:
        assert r.cfg.data.validation > 0 and r.cfg.seed == suite.tuning_seed
        assert r.cfg.simulation.backend == suite.backend
    image = {r.method: r.cfg for r in plan if r.task == "image"}
    assert image["fedavg"].data.name == "digits" and image["fedavg"].model.name == "lenet5"
    assert image["fedavg"].clients == 50 and image["fedavg"].data.alpha == 0.5
    m1d = {r.method: r.cfg for r in plan if r.task == "mnist1d"}
    assert m1d["fedavg"].data.name == "mnist1d" and m1d["fedavg"].clients == 100
    assert m1d["topk_ef"].codec.params["k"] == 152 and m1d["fetchsgd"].strategy.options["cols"] == 304
    dense = {r.method: r.cfg for r in plan if r.task == "dense"}
    assert dense["fedavg"].data.name == "synthetic" and dense["fedavg"].clients == 100


def _write_suite(tmp_path, **over) -> Path:
    raw = yaml.safe_load(SUITE.read_text())
    raw["tasks"] = {k: {**v, "config": str(REPO / "fl_sim" / v["config"])} for k, v in raw["tasks"].items()}
    for m in raw["methods"]:
        m["config"] = str(REPO / "fl_sim" / m["config"])
    raw.update(over)
    p = tmp_path / "suite.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_suite_rejects_unequal_budget_and_reused_seed(tmp_path):
    raw = yaml.safe_load(SUITE.read_text())
    raw["methods"][1]["grid"] = {"strategy.server_lr": [1.0, 2.0]}
    with pytest.raises(ConfigError, match="budget"):
        load_suite(_write_suite(tmp_path, methods=raw["methods"]))
    with pytest.raises(ConfigError, match="tuning_seed"):
        load_suite(_write_suite(tmp_path, tuning_seed=2))


# --------------------------------------------------------------------------------------------- resume
def test_resume_skips_only_matching_config_hash(tmp_path):
    suite = load_suite(SUITE)
    plan = plan_tuning(suite, ["dense"], ["fedavg"], tmp_path)[:1]
    calls = []

    def fake(cfg_dict, run_dir, digest, version):
        calls.append(run_dir)
        d = fabricate(Path(run_dir), [0.1, 0.5], 1, val=[0.1, 0.5])
        (d / DONE_FILE).write_text(json.dumps({"config_hash": digest, "code_version": version}))

    assert execute_plan(plan, runner=fake) == [] and len(calls) == 1
    execute_plan(plan, runner=fake)
    assert len(calls) == 1  # same config: skipped
    changed = plan_tuning(suite, ["dense"], ["fedavg"], tmp_path, extra=["rounds=3"])[:1]
    assert config_hash(changed[0].cfg) != config_hash(plan[0].cfg)
    execute_plan(changed, runner=fake)
    assert len(calls) == 2  # a changed setting reruns the slot


def test_failed_run_is_reported_not_fatal(tmp_path):
    suite = load_suite(SUITE)
    plan = plan_tuning(suite, ["dense"], ["fedavg"], tmp_path)[:2]

    def boom(cfg_dict, run_dir, digest, version):
        raise RuntimeError("exploded")

    failures = execute_plan(plan, runner=boom)
    assert len(failures) == 2 and "exploded" in failures[0]


# --------------------------------------------------------------------------------------------- validation split
def test_validation_split_is_held_out_stratified_and_seeded():
    cfg = load_config(REPO / "fl_sim" / "configs" / "compare" / "image.yaml", ["data.validation=0.1"])
    plain = load_source(cfg.data, 50, 0)
    y_all = plain.y.numpy().copy()
    src = hold_out_validation(load_source(cfg.data, 50, 0), 0.1, 0)
    xv, yv = src.x_val, src.y_val
    assert len(yv) + len(src.y) == len(y_all)
    counts_all = np.bincount(y_all, minlength=10)
    assert np.array_equal(np.bincount(yv.numpy(), minlength=10), np.rint(0.1 * counts_all).astype(int))
    train = {r.tobytes() for r in src.x.numpy()}  # the held-out rows left the training array
    assert not any(r.tobytes() in train for r in xv.numpy())
    assert np.array_equal(src.y_test.numpy(), plain.y_test.numpy())  # the test set is untouched
    again = hold_out_validation(load_source(cfg.data, 50, 0), 0.1, 0)
    assert np.array_equal(again.x_val.numpy(), xv.numpy())
    other = hold_out_validation(load_source(cfg.data, 50, 0), 0.1, 1)
    assert not np.array_equal(other.x_val.numpy(), xv.numpy())
    # through load_federated: clients index the reduced training array only
    fd = load_federated(cfg.data, 50, 0)
    assert np.array_equal(fd.validation_data()[1].numpy(), yv.numpy())
    assert max(int(p.max()) for p in fd.parts if len(p)) < len(fd.source.y) == len(src.y)
    assert load_federated(load_config(REPO / "fl_sim" / "configs" / "quickstart.yaml", ["clients=5", "clients_per_round=2"]).data, 5, 0).validation_data() is None


def test_validation_split_keeps_natural_clients():
    cfg = load_config(REPO / "fl_sim" / "configs" / "quickstart.yaml", ["data.validation=0.1", "clients=20"])
    plain = load_federated(load_config(REPO / "fl_sim" / "configs" / "quickstart.yaml", ["clients=20"]).data, 20, 0)
    fd = load_federated(cfg.data, 20, 0)
    sizes, before = fd.client_sizes, plain.client_sizes
    # every client loses about its share; none gains
    assert np.all(sizes <= before) and sizes.sum() + len(fd.validation_data()[1]) == before.sum()
    assert np.all(sizes >= 0.75 * before)


def test_validation_bad_value_one_line():
    with pytest.raises(ConfigError, match=r"data.validation"):
        load_config(None, ["data.validation=1.0"])


# --------------------------------------------------------------------------------------------- smoke
def test_compare_command_smoke(tmp_path):
    """2 rounds, 1 seed, 2 methods on the dense task with a budget-1 suite; then a rerun skips every run."""
    raw = yaml.safe_load(SUITE.read_text())
    methods = [m for m in raw["methods"] if m["name"] in ("fedavg", "topk_ef")]
    for m in methods:
        m["grid"] = {"strategy.server_lr": [1.0]}
    suite = _write_suite(tmp_path, methods=methods, budget=1, bracket={"factor": 2, "cap": 1})
    args = ["compare", str(suite), "--task", "dense", "--seeds", "1", "--set", "rounds=2", "--set", "clients=20",
            "--set", "clients_per_round=4", "--set", "model.hidden=[8]", "--set", "eval_every=1",
            "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "docs" / "runs.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith(
        "task,method,seed,final_accuracy,total_uplink_bits,total_downlink_bits,total_bits,uplink_bits_to_target")
    assert lines[1].endswith(",dense/runs/fedavg/seed1") and str(tmp_path) not in "".join(lines)
    import csv

    tuning = list(csv.DictReader((tmp_path / "docs" / "tuning.csv").open()))
    # bracket cap 1: the single grid point is on both edges, so each method adds lr 0.5 and stops at the cap
    assert len(tuning) == 2 * 2 and sum(r["chosen"] == "True" for r in tuning) == 2
    assert {r["point"] for r in tuning} == {"strategy.server_lr=1.0", "strategy.server_lr=0.5"}
    assert {(r["bracket"], r["tuning_runs"]) for r in tuning} == {("at cap", "2")}
    for f in ("summary.md", "summary.csv", "tuning.md", "pareto.png", "suite.json"):
        assert (tmp_path / "docs" / f).is_file(), f
    meta = json.loads((tmp_path / "docs" / "suite.json").read_text())
    assert meta["seeds"] == [1] and meta["failures"] == []
    env = meta["environment"]
    assert set(env["libraries"]) >= {"flwr", "torch", "numpy"} and env["libraries"]["flwr"] and env["python"]
    assert env["cpu_count"] >= 1 and "cpu" in env and "code_commit" in env and meta["backend"] == "inline"
    assert env["threads_of_reported_runs"] == [{"torch": 1, "cohort": 1}]
    assert str(tmp_path) not in json.dumps(meta)
    # every round of the last 20% is evaluated (rounds=2: ceil(0.4) = 1 -> rounds 0, 1 (eval_every), 2)
    # one reported row rerun from its recorded config gives the same numbers
    from fl_sim.experiments.compare.runner import _execute

    row = next(csv.DictReader((tmp_path / "docs" / "runs.csv").open()))
    src = tmp_path / "runs" / row["run_dir"]
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    _execute(cfg, str(tmp_path / "rerun"), "digest", "v")

    def numbers(d):
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader((d / "metrics.csv").open())]

    assert numbers(src) == numbers(tmp_path / "rerun") and len(numbers(src)) == 3
    again = json.loads((tmp_path / "rerun" / "summary.json").read_text())
    assert f"{again['final_test_accuracy']:.6g}" == row["final_accuracy"]
    assert again["total_bits"] == int(row["total_bits"])
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 0 and res2.output.count("done, skipped") == 6, res2.output


def test_compare_bad_task_exits_2(tmp_path):
    res = CliRunner().invoke(app, ["compare", "--task", "audio", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "audio" in res.output and "Traceback" not in res.output


def test_rlc_suite_keeps_each_methods_channel(tmp_path):
    suite = load_suite(REPO / "fl_sim" / "configs" / "compare" / "rlc.yaml")
    plan = plan_tuning(suite, list(suite.tasks), [m.name for m in suite.methods], tmp_path)
    cfgs = {r.method: r.cfg for r in plan}
    assert cfgs["rlc_m10db"].channel["snr_db"] == -10 and cfgs["rlc_m10db"].strategy.name == "rlc"
    assert cfgs["qcs_g320"].strategy.name == "qcs" and cfgs["qcs_g320"].clients_per_round == 16
    assert {r.cfg.train.lr for r in plan} == {0.1, 0.2, 0.4}
    # a task's own channel never leaks into a method without one
    dense = plan_tuning(load_suite(SUITE), ["dense"], ["fedavg"], tmp_path)[0]
    assert dense.cfg.channel == {}


def test_worker_runs_batched_calls_on_one_thread(tmp_path, monkeypatch):
    """A suite worker keeps its one-thread contract: automatic cohort_threads (one per core) becomes 1, so
    --jobs N vectorized workers do not each take every core; an explicit value is kept."""
    import fl_sim.experiments.compare.runner as fc
    import fl_sim.runs.simulation as fsim

    seen = []
    monkeypatch.setattr(fsim, "run_experiment", lambda cfg, d: seen.append(cfg.simulation.cohort_threads) or {})
    for threads in (0, 3):
        cfg = fc.config_to_dict(load_config("quickstart", [f"simulation.cohort_threads={threads}"]))
        fc._execute(cfg, str(tmp_path / f"run{threads}"), "digest", "v")
    assert seen == [1, 3]


def test_rlc_at_scale_suite_builds_and_one_reduced_round_keeps_one_channel_ledger(tmp_path):
    """The scale suite composes 5,000 clients, 1,000 a round, the same channel for RLC and digital QCS;
    one round of it in reduced form (50 clients, 10 a round) runs for both, and the report carries
    their channel uses beside accuracy."""
    from fl_sim.experiments.compare.runner import _execute
    from fl_sim.config import config_to_dict

    suite = load_suite(REPO / "fl_sim" / "configs" / "compare" / "rlc_scale.yaml")
    full = {r.method: r.cfg for r in plan_tuning(suite, list(suite.tasks), ["qcs", "rlc"], tmp_path)}
    for cfg in full.values():
        assert (cfg.clients, cfg.clients_per_round) == (5000, 1000)
        assert cfg.channel["snr_db"] == 10 and cfg.channel["bandwidth_hz"] == 1e6
    assert full["rlc"].strategy.name == "rlc" and full["rlc"].channel["participation"] == 1.0
    assert full["qcs"].strategy.name == "qcs"
    small = plan_tuning(suite, list(suite.tasks), ["qcs", "rlc"], tmp_path,
                        extra=["clients=50", "clients_per_round=10", "rounds=1", "model.hidden=[16]"])[::3]
    runs = []
    for r in small:
        _execute(config_to_dict(r.cfg), str(r.run_dir), "digest", "v")
        runs.append({"task": r.task, "method": r.method, "seed": 1, "run_dir": r.run_dir})
    run_rows, summary, targets = aggregate(runs, baseline="qcs", root=tmp_path)
    uses = {x["method"]: x["total_channel_uses"] for x in run_rows}
    assert uses["qcs"] > 0 and uses["rlc"] > 0
    md = (write_outputs(suite, tmp_path / "docs", run_rows, summary, targets, [], {}) and
          (tmp_path / "docs" / "summary.md").read_text())
    assert "channel uses to target" in md


def test_mnist1d_task_has_thousands_of_test_rows_or_a_clear_message(monkeypatch):
    """The third task: 20,000 generated signals -> 4,000 stratified test rows and 1,600 validation rows;
    the generator's seeding of the global RNGs does not leak. Without the optional package: a one-line
    DataError naming it."""
    import random
    import sys

    from fl_sim.data.errors import DataError

    cfg = load_config(REPO / "fl_sim" / "configs" / "compare" / "mnist1d.yaml", ["data.validation=0.1"])
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install mnist1d"):
            load_source(cfg.data, 100, 1)
        pytest.skip("optional package mnist1d not installed: only the message is checked")
    np.random.seed(3)
    random.seed(3)
    fd = load_federated(cfg.data, 100, 1)
    assert (np.random.rand(), random.random()) == (np.random.RandomState(3).rand(), random.Random(3).random())
    assert len(fd.source.y_test) == 4000 and len(fd.validation_data()[1]) == 1600
    assert np.array_equal(np.bincount(fd.source.y_test.numpy()), [400] * 10)
    assert tuple(fd.source.x.shape[1:]) == (40,)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # as if not installed
    with pytest.raises(DataError, match="pip install mnist1d"):
        load_source(cfg.data, 100, 1)


def test_knob_variants_keep_the_uplink_budget_and_scale_per_task(tmp_path):
    """FetchSGD's k at cols/2 and cols/10 (the authors' code) on every task, the sketch (hence the uplink
    bits) unchanged; each variant gets the same step grid, and the point names carry the variant."""
    suite = load_suite(SUITE)
    plan = plan_tuning(suite, list(suite.tasks), ["fetchsgd"], tmp_path)
    ks = {}
    for r in plan:
        o = r.cfg.strategy.options
        ks.setdefault(r.task, set()).add((o["rows"], o["cols"], o["k"]))
    assert ks == {"dense": {(5, 284, 142), (5, 284, 28)}, "image": {(5, 1234, 617), (5, 1234, 123)},
                  "mnist1d": {(5, 304, 152), (5, 304, 30)}}
    names = {r.run_dir.parent.name for r in plan if r.task == "dense"}
    assert "knob=k_cols_tenth,strategy.server_lr=0.15" in names and len(names) == 6
    bad = yaml.safe_load(SUITE.read_text())
    bad["methods"][0]["knobs"] = {"v": {"audio": ["strategy.server_lr=1.0"]}}
    with pytest.raises(ConfigError, match="unknown tasks"):
        load_suite(_write_suite(tmp_path, methods=bad["methods"]))
