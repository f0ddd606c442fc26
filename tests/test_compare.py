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
    config_hash,
    execute_plan,
    load_suite,
    plan_tuning,
    write_outputs,
)
from fl_sim.config import ConfigError, load_config
from fl_sim.data import load_federated
from fl_sim.data.sources import load_source
from fl_sim.data.validation import hold_out_validation

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "fl_sim" / "configs" / "compare" / "suite.yaml"


# --------------------------------------------------------------------------------------------- helpers
def fabricate(run_dir: Path, accs, bits, *, val=None, val_loss=None, name="r") -> Path:
    """A run directory: metrics.csv rows for rounds 0..len(accs)-1 (acc None = not evaluated that round),
    uplink bits per round (round 0 sends nothing), and summary.json as RunRecorder.finish writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = ["round,train_loss,test_loss,test_accuracy,uplink_bits,downlink_bits,wall_s,val_loss,val_accuracy"]
    for rnd, acc in enumerate(accs):
        b = 0 if rnd == 0 else bits
        v = "" if val is None or val[rnd] is None else val[rnd]
        vl = "" if v == "" else (1.0 if val_loss is None else val_loss[rnd])
        lines.append(f"{rnd},,{'' if acc is None else 1.0},{'' if acc is None else acc},{b},{b},0.1,{vl},{v}")
    (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    final = [a for a in accs if a is not None][-1]
    (run_dir / "summary.json").write_text(json.dumps({
        "name": name, "rounds": len(accs) - 1, "final_test_accuracy": final,
        "total_uplink_bits": bits * (len(accs) - 1)}))
    return run_dir


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregate_hand_computed(tmp_path):
    """Two seeds of FedAvg and of a compressed method m; every figure below is computed by hand.

    FedAvg finals 0.8 and 1.0 -> mean 0.9 -> target 0.9 x 0.9 = 0.81.
    FedAvg s1 accuracies 0.5, 0.8, 0.8 never reach 0.81 -> no bits to target; s2 reaches at round 2 -> 200 bits.
    m s1 reaches at round 1 (0.82) -> 10 bits; m s2 is not evaluated at round 2 (its 10 bits still count)
    and reaches at round 3 (0.85) -> 30 bits. Savings are paired by seed: s1 has no FedAvg figure, s2 200/30.
    """
    runs = [
        {"task": "t", "method": "fedavg", "seed": 1, "run_dir": fabricate(tmp_path / "f1", [0.1, 0.5, 0.8, 0.8], 100)},
        {"task": "t", "method": "fedavg", "seed": 2, "run_dir": fabricate(tmp_path / "f2", [0.1, 0.6, 0.9, 1.0], 100)},
        {"task": "t", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "m1", [0.1, 0.82, 0.7, 0.75], 10)},
        {"task": "t", "method": "m", "seed": 2, "run_dir": fabricate(tmp_path / "m2", [0.1, 0.3, None, 0.85], 10)},
        # a second task with its own baseline and target: 0.9 x 0.5 = 0.45, reached by its m at round 2
        {"task": "u", "method": "fedavg", "seed": 1, "run_dir": fabricate(tmp_path / "u1", [0.1, 0.3, 0.5], 50)},
        {"task": "u", "method": "m", "seed": 1, "run_dir": fabricate(tmp_path / "u2", [0.1, 0.2, 0.46], 5)},
    ]
    run_rows, summary, targets = aggregate(runs, baseline="fedavg", target_fraction=0.9)
    assert targets["t"] == pytest.approx(0.81)
    assert targets["u"] == pytest.approx(0.45)
    by = {(r["task"], r["method"], r["seed"]): r for r in run_rows}
    assert by["t", "fedavg", 1]["bits_to_target"] is None
    assert by["t", "fedavg", 2]["bits_to_target"] == 200
    assert by["t", "m", 1]["bits_to_target"] == 10
    assert by["t", "m", 2]["bits_to_target"] == 30
    assert by["t", "m", 1]["savings_vs_baseline"] is None
    assert by["t", "m", 2]["savings_vs_baseline"] == pytest.approx(200 / 30)
    assert by["u", "m", 1]["bits_to_target"] == 10 and by["u", "fedavg", 1]["bits_to_target"] == 100
    s = {(r["task"], r["method"]): r for r in summary}
    f, m = s["t", "fedavg"], s["t", "m"]
    assert (f["final_accuracy_mean"], f["final_accuracy_min"], f["final_accuracy_max"]) == pytest.approx((0.9, 0.8, 1.0))
    assert (f["bits_to_target_mean"], f["reached"], f["seeds"]) == (200, 1, 2)
    assert (m["final_accuracy_mean"], m["final_accuracy_min"], m["final_accuracy_max"]) == pytest.approx((0.8, 0.75, 0.85))
    assert (m["total_uplink_bits_mean"], m["total_uplink_bits_min"], m["total_uplink_bits_max"]) == (30, 30, 30)
    assert (m["bits_to_target_mean"], m["bits_to_target_min"], m["bits_to_target_max"]) == (20, 10, 30)
    assert m["reached"] == 2
    assert (m["savings_mean"], m["savings_min"], m["savings_max"]) == pytest.approx((200 / 30,) * 3)
    assert s["u", "m"]["savings_mean"] == pytest.approx(10.0)


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
    for col in ("task", "method", "seed", "final_accuracy", "total_uplink_bits", "bits_to_target"):
        assert col in rows[0]
    assert rows[0]["bits_to_target"] == "100" and rows[1]["bits_to_target"] == ""
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


# --------------------------------------------------------------------------------------------- suite spec
def test_suite_every_config_validates_with_equal_budget_and_distinct_tuning_seed(tmp_path):
    suite = load_suite(SUITE)
    assert suite.tuning_seed not in suite.seeds and len(suite.seeds) == 3
    assert set(suite.tasks) == {"dense", "image"}
    plan = plan_tuning(suite, list(suite.tasks), [m.name for m in suite.methods], tmp_path)
    assert len(plan) == len(suite.tasks) * len(suite.methods) * suite.budget
    for r in plan:
        assert r.cfg.data.validation > 0 and r.cfg.seed == suite.tuning_seed
        assert r.cfg.simulation.backend == suite.backend
    image = {r.method: r.cfg for r in plan if r.task == "image"}
    assert image["fedavg"].data.name == "digits" and image["fedavg"].model.name == "lenet5"
    assert image["fedavg"].clients == 50 and image["fedavg"].data.alpha == 0.5
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
    suite = _write_suite(tmp_path, methods=methods, budget=1)
    args = ["compare", str(suite), "--task", "dense", "--seeds", "1", "--set", "rounds=2", "--set", "clients=20",
            "--set", "clients_per_round=4", "--set", "model.hidden=[8]", "--set", "eval_every=1",
            "--out", str(tmp_path / "runs"), "--docs", str(tmp_path / "docs")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "docs" / "runs.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("task,method,seed,final_accuracy,total_uplink_bits,bits_to_target")
    tuning = (tmp_path / "docs" / "tuning.csv").read_text().splitlines()
    assert len(tuning) == 1 + 2 and sum(l.endswith("True") for l in tuning) == 2
    for f in ("summary.md", "summary.csv", "tuning.md", "pareto.png", "suite.json"):
        assert (tmp_path / "docs" / f).is_file(), f
    meta = json.loads((tmp_path / "docs" / "suite.json").read_text())
    assert meta["seeds"] == [1] and meta["failures"] == []
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 0 and res2.output.count("done, skipped") == 4, res2.output


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
