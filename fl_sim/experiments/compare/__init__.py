"""The method comparison suite: ``fl-sim compare [SUITE] [--task dense|image|all] [--seeds 3] [--jobs N]``.

A suite is a YAML file (default ``configs/compare/suite.yaml``) naming tasks (a base config: data, model,
local training, clients, rounds), methods (the ``strategy:`` and ``codec:`` sections of a method config,
plus per-task ``set`` overrides) and for every method a tuning grid of exactly ``budget`` points. The
protocol (docs/comparison/README.md):

1. **Tuning** on the validation split (``data.validation``, rows held out of the training data before the
   partition; fl_sim/data/validation.py) with one ``tuning_seed`` that is none of the reported seeds:
   every grid point runs once, and the point with the highest validation accuracy (mean of the last
   ``tuning_window`` evaluations; ties: the point listed first) is chosen. The test columns of the
   tuning runs are never read.
2. **Reported runs**: the chosen point with every reported seed (each seed changes the data partition,
   the validation split, the model init and the client sampling); final evaluation on the test set.
3. **Aggregation** (:func:`aggregate`): per task, target = ``target_fraction`` x the mean final test
   accuracy of the ``baseline`` method over the seeds; per run, bits to target = cumulative uplink bits
   up to the first evaluated round at or above the target (empty if never); per method, mean and
   min..max over seeds of final accuracy, total uplink bits and bits to target (over the seeds that
   reached it), and the savings vs the baseline paired by seed (baseline's bits to target at seed s /
   the method's at seed s) with their mean and min..max.

Runs live in ``OUT/TASK/tune/METHOD/POINT/seedS`` and ``OUT/TASK/runs/METHOD/seedS``; each finished run
holds ``suite_run.json`` with the SHA-256 of its resolved config, and is skipped on a rerun only when that
hash matches (so the suite resumes after an interruption, and a changed setting reruns what it changes).
Runs execute in ``jobs`` worker processes (one torch thread each, the vectorized backend's batched calls
included: ``simulation.cohort_threads`` 0 becomes 1). The docs directory gets
``runs.csv`` (one row per reported run), ``summary.csv`` / ``summary.md``, ``tuning.csv`` / ``tuning.md``
(grids, validation accuracies and choices), ``pareto.png`` and ``suite.json`` (settings, code version).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_sim.config import ConfigError, RunConfig, apply_overrides, config_from_dict, config_to_dict
from fl_sim.runs.results import atomic_write, bits_to_reach, load_run

__all__ = [
    "Suite",
    "Method",
    "Task",
    "load_suite",
    "config_hash",
    "plan_tuning",
    "plan_reported",
    "choose",
    "aggregate",
    "run_compare",
    "write_outputs",
    "DONE_FILE",
]

DONE_FILE = "suite_run.json"
ProgressFn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# Suite spec
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    config: Path
    set: list[str] = field(default_factory=list)
    title: str = ""


@dataclass
class Method:
    name: str
    config: Path
    label: str = ""
    set: list[str] = field(default_factory=list)
    task_set: dict[str, list[str]] = field(default_factory=dict)  # per-task overrides
    grid: list[tuple[str, list[Any]]] = field(default_factory=list)

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """The grid's points in declared order (cartesian product of the keys' values)."""
        keys = [k for k, _ in self.grid]
        return [tuple(zip(keys, combo)) for combo in itertools.product(*[v for _, v in self.grid])]


@dataclass
class Suite:
    path: Path
    tasks: dict[str, Task]
    methods: list[Method]
    seeds: list[int]
    tuning_seed: int
    budget: int
    baseline: str = "fedavg"
    target_fraction: float = 0.9
    tuning_window: int = 3
    backend: str = "inline"
    set: list[str] = field(default_factory=list)
    title: str = ""

    def method(self, name: str) -> Method:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]  # fl_sim/experiments/compare/__init__.py -> the checkout


def default_suite_path() -> Path:
    from fl_sim.config import config_dir

    return config_dir() / "compare" / "suite.yaml"


def _resolve(path: str, spec_path: Path) -> Path:
    from fl_sim.config import packaged_config

    p = Path(path)
    for cand in (p, spec_path.parent / p, _repo_root() / p):
        if cand.is_file():
            return cand
    try:
        return packaged_config(path)  # "configs/qsgd.yaml": the shipped config (fl_sim/configs)
    except Exception:  # noqa: BLE001 - not a shipped config either: the error below names the path
        pass
    raise FileNotFoundError(f"{spec_path}: config {path!r} not found (relative to the working directory, the suite, or the repository)")


def _str_list(v: Any, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{where}: expected a list of 'key=value' strings")
    return list(v)


def _fmt_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(v, str) else v


def load_suite(path: str | Path | None = None) -> Suite:
    """Read and check a suite YAML (tasks, methods with equal-size grids, seeds distinct from the tuning seed)."""
    p = Path(path) if path is not None else default_suite_path()
    if not p.is_file():
        raise FileNotFoundError(f"suite {p} not found; give a YAML path (default configs/compare/suite.yaml)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict) or not isinstance(raw.get("methods"), list):
        raise ConfigError(f"{p}: expected a mapping with 'tasks' (a mapping) and 'methods' (a list)")
    tasks = {}
    for name, t in raw["tasks"].items():
        if not isinstance(t, dict) or "config" not in t:
            raise ConfigError(f"{p}: task {name!r} needs a 'config' path")
        tasks[str(name)] = Task(str(name), _resolve(str(t["config"]), p), _str_list(t.get("set"), f"{p}: task {name}.set"),
                                str(t.get("title", "")))
    budget = int(raw.get("budget", 3))
    methods, seen = [], set()
    for m in raw["methods"]:
        if not isinstance(m, dict) or "name" not in m or "config" not in m:
            raise ConfigError(f"{p}: every method needs 'name' and 'config'")
        name = str(m["name"])
        if name in seen:
            raise ConfigError(f"{p}: method {name!r} is listed twice")
        seen.add(name)
        grid_raw = m.get("grid") or {}
        if not isinstance(grid_raw, dict) or not all(isinstance(v, list) and v for v in grid_raw.values()):
            raise ConfigError(f"{p}: method {name}.grid must map keys to non-empty lists of values")
        grid = [(str(k), list(v)) for k, v in grid_raw.items()]
        task_set = {t: _str_list(m.get(t), f"{p}: method {name}.{t}") for t in tasks if t in m}
        meth = Method(name, _resolve(str(m["config"]), p), str(m.get("label", name)),
                      _str_list(m.get("set"), f"{p}: method {name}.set"), task_set, grid)
        n_points = len(meth.points())
        if n_points != budget:
            raise ConfigError(f"{p}: method {name!r} has {n_points} grid points but the declared budget is {budget}; "
                              "every method gets the same number of tuning runs")
        methods.append(meth)
    seeds = [int(s) for s in raw.get("seeds", [1, 2, 3])]
    tuning_seed = int(raw.get("tuning_seed", 0))
    if tuning_seed in seeds:
        raise ConfigError(f"{p}: tuning_seed={tuning_seed} is one of the reported seeds {seeds}; use a distinct seed")
    suite = Suite(p, tasks, methods, seeds, tuning_seed, budget, str(raw.get("baseline", "fedavg")),
                  float(raw.get("target_fraction", 0.9)), int(raw.get("tuning_window", 3)),
                  str(raw.get("backend", "inline")), _str_list(raw.get("set"), f"{p}: set"), str(raw.get("title", "")))
    if suite.baseline not in seen:
        raise ConfigError(f"{p}: baseline {suite.baseline!r} is not among the methods")
    return suite


# ---------------------------------------------------------------------------------------------------
# Configs and plans
# ---------------------------------------------------------------------------------------------------
def _yaml(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return raw


def compose_config(suite: Suite, task: str, method: str, sets: list[str], *, extra: list[str] = (),
                   backend: str | None = None) -> RunConfig:
    """The task's config with the method's ``strategy``, ``codec`` (and ``channel``, if any) sections, then overrides in order:
    suite ``set``, task ``set``, method ``set``, the method's per-task ``set``, ``sets`` (grid point, seed),
    ``extra`` (the command line's ``--set``) and ``simulation.backend``."""
    t, m = suite.tasks[task], suite.method(method)
    raw = copy.deepcopy(_yaml(t.config))
    mraw = _yaml(m.config)
    raw["strategy"] = copy.deepcopy(mraw.get("strategy") or {"name": "fedavg"})
    raw["codec"] = copy.deepcopy(mraw.get("codec") or {})
    raw.pop("channel", None)
    if mraw.get("channel"):  # over-the-air / digital-over-channel methods bring their channel section
        raw["channel"] = copy.deepcopy(mraw["channel"])
    raw["name"] = f"{task}-{method}"
    order = [*suite.set, *t.set, *m.set, *m.task_set.get(task, []), *sets, *extra,
             f"simulation.backend={backend or suite.backend}"]
    try:
        return config_from_dict(apply_overrides(raw, order))
    except ConfigError as exc:
        raise ConfigError(f"compare {task}/{method}: {exc}") from None


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 of the resolved config (canonical JSON of config_to_dict)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def point_name(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{k}={_fmt_value(v)}" for k, v in point).replace("/", "_") or "base"


@dataclass
class PlannedRun:
    task: str
    method: str
    seed: int
    point: tuple[tuple[str, Any], ...]
    cfg: RunConfig
    run_dir: Path
    phase: str  # "tune" | "report"


def plan_tuning(suite: Suite, tasks: list[str], methods: list[str], out: Path, *, extra: list[str] = (),
                backend: str | None = None) -> list[PlannedRun]:
    plan = []
    for task in tasks:
        for name in methods:
            for point in suite.method(name).points():
                sets = [f"{k}={_fmt_value(v)}" for k, v in point] + [f"seed={suite.tuning_seed}"]
                cfg = compose_config(suite, task, name, sets, extra=extra, backend=backend)
                run_dir = out / task / "tune" / name / point_name(point) / f"seed{suite.tuning_seed}"
                plan.append(PlannedRun(task, name, suite.tuning_seed, point, cfg, run_dir, "tune"))
    return plan


def plan_reported(suite: Suite, choices: dict[tuple[str, str], tuple[tuple[str, Any], ...]], seeds: list[int],
                  out: Path, *, extra: list[str] = (), backend: str | None = None) -> list[PlannedRun]:
    plan = []
    for (task, name), point in choices.items():
        for s in seeds:
            sets = [f"{k}={_fmt_value(v)}" for k, v in point] + [f"seed={s}"]
            cfg = compose_config(suite, task, name, sets, extra=extra, backend=backend)
            plan.append(PlannedRun(task, name, s, point, cfg, out / task / "runs" / name / f"seed{s}", "report"))
    return plan


# ---------------------------------------------------------------------------------------------------
# Running (resumable, parallel)
# ---------------------------------------------------------------------------------------------------
def is_done(run_dir: Path, digest: str) -> bool:
    """A run is done when its summary.json and suite_run.json exist and the stored config hash matches."""
    marker = Path(run_dir) / DONE_FILE
    if not (marker.is_file() and (Path(run_dir) / "summary.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("config_hash") == digest
    except (OSError, ValueError):
        return False


def code_version() -> str:
    """``git describe --always --dirty`` of the fl_sim source tree, or "unknown"."""
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=_repo_root(),
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _execute(cfg_dict: dict[str, Any], run_dir: str, digest: str, version: str) -> dict[str, Any]:
    """Worker: run one config into run_dir (replacing an unfinished or stale earlier attempt), then mark it done."""
    import torch

    torch.set_num_threads(1)
    from fl_sim.runs.simulation import run_experiment

    sim = cfg_dict.setdefault("simulation", {})
    if not sim.get("cohort_threads"):  # automatic = one per core: jobs x cores threads would contend
        sim["cohort_threads"] = 1

    d = Path(run_dir)
    if d.exists():  # this suite's own directory: an interrupted or outdated run of the same slot
        stale = d.with_name(f".{d.name}.replaced-{int(time.time())}")
        d.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_experiment(config_from_dict(cfg_dict), d)
    atomic_write(d / DONE_FILE, json.dumps({"config_hash": digest, "code_version": version,
                                            "wall_s": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
    return {"final_test_accuracy": summary.get("final_test_accuracy")}


def execute_plan(plan: list[PlannedRun], *, jobs: int = 1, progress: ProgressFn = lambda s: None,
                 runner: Callable[..., Any] | None = None) -> list[str]:
    """Run every planned run that is not done (``jobs`` worker processes); returns failure messages."""
    version = code_version()
    todo = []
    for r in plan:
        digest = config_hash(r.cfg)
        if is_done(r.run_dir, digest):
            progress(f"{r.task}/{r.method} {point_name(r.point)} seed {r.seed}: done, skipped")
        else:
            todo.append((r, digest))
    failures: list[str] = []
    if not todo:
        return failures
    fn = runner or _execute
    label = {id(r): f"{r.task}/{r.method} {point_name(r.point)} seed {r.seed}" for r, _ in todo}
    if jobs <= 1:
        for r, digest in todo:
            progress(f"{label[id(r)]}: running")
            try:
                fn(config_to_dict(r.cfg), str(r.run_dir), digest, version)
            except Exception as exc:  # one failed run must not lose the others
                failures.append(f"{label[id(r)]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                progress(f"{label[id(r)]}: FAILED ({failures[-1]})")
        return failures
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending: dict[Future, PlannedRun] = {}
        for r, digest in todo:
            pending[pool.submit(fn, config_to_dict(r.cfg), str(r.run_dir), digest, version)] = r
        progress(f"{len(todo)} runs on {jobs} workers")
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                r = pending.pop(f)
                exc = f.exception()
                if exc is not None:
                    failures.append(f"{label[id(r)]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                    progress(f"{label[id(r)]}: FAILED ({failures[-1]})")
                else:
                    progress(f"{label[id(r)]}: finished ({len(pending)} left)")
    return failures


# ---------------------------------------------------------------------------------------------------
# Tuning choice and aggregation (pure functions of run directories)
# ---------------------------------------------------------------------------------------------------
def _evaluated(rows: list[dict[str, float]], col: str) -> list[float]:
    return [r[col] for r in rows if col in r and r[col] is not None and math.isfinite(r[col])]


def validation_score(run_dir: Path, window: int) -> float | None:
    """Mean of the last ``window`` finite ``val_accuracy`` values of a run (None: no validation column)."""
    _, rows = load_run(run_dir)
    evaluated = [r for r in rows if r.get("val_accuracy") is not None and math.isfinite(r["val_accuracy"])]
    if not evaluated:
        return None
    # A diverged model still gets an accuracy (argmax of NaN logits) but its loss is NaN: score it 0.
    last_loss = evaluated[-1].get("val_loss")
    if last_loss is None or not math.isfinite(last_loss):
        return 0.0
    vals = [r["val_accuracy"] for r in evaluated]
    tail = vals[-window:]
    return sum(tail) / len(tail)


def choose(tuning: list[PlannedRun], window: int) -> tuple[dict[tuple[str, str], tuple], list[dict[str, Any]]]:
    """Per (task, method) the grid point with the highest validation score (first listed wins ties).

    Returns the choices and one row per tuning run (task, method, point, val_score, chosen). Only the
    ``val_accuracy`` / ``val_loss`` columns are read: the tuning runs' test accuracy never enters.
    """
    best: dict[tuple[str, str], tuple[float, tuple]] = {}
    rows = []
    for r in tuning:
        if not (r.run_dir / "metrics.csv").is_file():
            score = None
        else:
            score = validation_score(r.run_dir, window)
            if score is None:
                raise ValueError(f"{r.run_dir}: no val_accuracy column; tuning needs data.validation > 0")
        rows.append({"task": r.task, "method": r.method, "point": point_name(r.point), "seed": r.seed,
                     "val_score": score})
        key = (r.task, r.method)
        if score is not None and (key not in best or score > best[key][0]):
            best[key] = (score, r.point)
    choices = {k: v[1] for k, v in best.items()}
    for row in rows:
        chosen = choices.get((row["task"], row["method"]))
        row["chosen"] = chosen is not None and point_name(chosen) == row["point"]
    return choices, rows


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return sum(vals) / len(vals), min(vals), max(vals)


def aggregate(runs: list[dict[str, Any]], *, baseline: str = "fedavg", target_fraction: float = 0.9,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Per-run rows with bits to target, per-(task, method) summaries, and each task's target.

    ``runs``: dicts with task, method, seed, run_dir (a run directory with metrics.csv and summary.json).
    target[task] = target_fraction x mean over seeds of the baseline's final test accuracy;
    bits_to_target = uplink bits summed up to the first evaluated round with test accuracy >= target
    (None if never); savings at seed s = baseline's bits_to_target at s / the method's at s (seeds where
    both reached the target).
    """
    loaded = []
    for r in runs:
        summary, rows = load_run(r["run_dir"])
        loaded.append((r, summary, rows))
    targets: dict[str, float] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        base = [s.get("final_test_accuracy") for r, s, _ in loaded if r["task"] == task and r["method"] == baseline]
        base = [b for b in base if b is not None]
        if not base:
            raise ValueError(f"task {task}: no finished run of the baseline {baseline!r}; the target is undefined")
        targets[task] = target_fraction * sum(base) / len(base)
    run_rows = []
    for r, summary, rows in loaded:
        acc = summary.get("final_test_accuracy")
        run_rows.append({
            "task": r["task"], "method": r["method"], "seed": r["seed"],
            "final_accuracy": acc,
            "total_uplink_bits": summary.get("total_uplink_bits"),
            "bits_to_target": bits_to_reach(rows, targets[r["task"]]),
            "target": targets[r["task"]],
            "rounds": summary.get("rounds"),
            "final_val_accuracy": (_evaluated(rows, "val_accuracy") or [None])[-1],
            "point": r.get("point", ""),
            "run_dir": str(r["run_dir"]),
        })
    base_btt = {(x["task"], x["seed"]): x["bits_to_target"] for x in run_rows if x["method"] == baseline}
    for x in run_rows:
        b, m = base_btt.get((x["task"], x["seed"])), x["bits_to_target"]
        x["savings_vs_baseline"] = (b / m) if (b and m) else None
    summary_rows = []
    for task, method in dict.fromkeys((x["task"], x["method"]) for x in run_rows):
        xs = [x for x in run_rows if x["task"] == task and x["method"] == method]
        acc = _stats([x["final_accuracy"] for x in xs])
        bits = _stats([x["total_uplink_bits"] for x in xs])
        btt = _stats([x["bits_to_target"] for x in xs])
        sav = _stats([x["savings_vs_baseline"] for x in xs])
        summary_rows.append({
            "task": task, "method": method, "seeds": len(xs),
            "reached": sum(x["bits_to_target"] is not None for x in xs),
            "target": targets[task],
            "final_accuracy_mean": acc[0], "final_accuracy_min": acc[1], "final_accuracy_max": acc[2],
            "total_uplink_bits_mean": bits[0], "total_uplink_bits_min": bits[1], "total_uplink_bits_max": bits[2],
            "bits_to_target_mean": btt[0], "bits_to_target_min": btt[1], "bits_to_target_max": btt[2],
            "savings_mean": sav[0], "savings_min": sav[1], "savings_max": sav[2],
            "point": xs[0]["point"],
        })
    return run_rows, summary_rows, targets


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict[str, Any]], cols: list[str] | None = None) -> Path:
    cols = cols or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r[k])) for k in cols})
    atomic_write(path, buf.getvalue())
    return path


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _spread(mean: float | None, lo: float | None, hi: float | None, fmt: str) -> str:
    if mean is None:
        return "not reached"
    return f"{mean:{fmt}} ({lo:{fmt}}..{hi:{fmt}})"


def summary_markdown(summary_rows: list[dict[str, Any]], targets: dict[str, float], labels: dict[str, str],
                     baseline: str) -> str:
    lines = []
    for task, target in targets.items():
        lines += [f"### {task} (target = {target:.3f})", "",
                  "| method | tuned | final accuracy | total uplink bits | bits to target (reached) | savings vs "
                  f"{labels.get(baseline, baseline)} |", "|---|---|---|---|---|---|"]
        for r in summary_rows:
            if r["task"] != task:
                continue
            btt = _spread(r["bits_to_target_mean"], r["bits_to_target_min"], r["bits_to_target_max"], ".3g")
            sav = _spread(r["savings_mean"], r["savings_min"], r["savings_max"], ".2f").replace("not reached", "-")
            lines.append(f"| {labels.get(r['method'], r['method'])} | {r['point']} | "
                         f"{_spread(r['final_accuracy_mean'], r['final_accuracy_min'], r['final_accuracy_max'], '.3f')} | "
                         f"{_spread(r['total_uplink_bits_mean'], r['total_uplink_bits_min'], r['total_uplink_bits_max'], '.3g')} | "
                         f"{btt} ({r['reached']}/{r['seeds']}) | {sav}{'x' if r['savings_mean'] is not None else ''} |")
        lines.append("")
    return "\n".join(lines)


def tuning_markdown(suite: Suite, tuning_rows: list[dict[str, Any]]) -> str:
    lines = [f"Budget: {suite.budget} runs per method and task, tuning seed {suite.tuning_seed} (reported seeds "
             f"{', '.join(map(str, suite.seeds))}); score = mean validation accuracy of the last "
             f"{suite.tuning_window} evaluations; chosen in **bold**.", "",
             "| task | method | grid point | validation score |", "|---|---|---|---|"]
    for r in tuning_rows:
        score = "missing" if r["val_score"] is None else f"{r['val_score']:.4f}"
        pt = f"**{r['point']}**" if r["chosen"] else r["point"]
        lines.append(f"| {r['task']} | {r['method']} | {pt} | {score} |")
    return "\n".join(lines) + "\n"


def plot_pareto(summary_rows: list[dict[str, Any]], targets: dict[str, float], labels: dict[str, str], path: Path) -> Path:
    """One panel per task: final accuracy against total uplink bits (log x), mean with min..max bars,
    the non-dominated methods (by mean) joined, the target as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(targets)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary_rows if r["task"] == task and r["final_accuracy_mean"] is not None]
        for r in rows:
            x, y = r["total_uplink_bits_mean"], r["final_accuracy_mean"]
            ax.errorbar(x, y, xerr=[[x - r["total_uplink_bits_min"]], [r["total_uplink_bits_max"] - x]],
                        yerr=[[y - r["final_accuracy_min"]], [r["final_accuracy_max"] - y]], fmt="o", ms=5, capsize=3)
            ax.annotate(labels.get(r["method"], r["method"]), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = sorted(rows, key=lambda r: (r["total_uplink_bits_mean"], -r["final_accuracy_mean"]))
        best, pts = -1.0, []
        for r in front:
            if r["final_accuracy_mean"] > best:
                best = r["final_accuracy_mean"]
                pts.append((r["total_uplink_bits_mean"], best))
        if pts:
            ax.plot(*zip(*pts), "k--", lw=0.8, alpha=0.6, label="front (means)")
        ax.axhline(targets[task], color="gray", ls=":", lw=0.9, label=f"target {targets[task]:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("total uplink bits (mean, min..max over seeds)")
        ax.set_ylabel("final test accuracy (mean, min..max)")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path


RUN_COLUMNS = ["task", "method", "seed", "final_accuracy", "total_uplink_bits", "bits_to_target", "target",
               "savings_vs_baseline", "final_val_accuracy", "rounds", "point", "run_dir"]


def write_outputs(suite: Suite, docs: Path, run_rows, summary_rows, targets, tuning_rows, meta: dict[str, Any]) -> list[Path]:
    labels = {m.name: m.label for m in suite.methods}
    docs.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_csv(docs / "runs.csv", run_rows, RUN_COLUMNS),
        _write_csv(docs / "summary.csv", summary_rows),
        _write_csv(docs / "tuning.csv", tuning_rows, ["task", "method", "point", "seed", "val_score", "chosen"]),
    ]
    atomic_write(docs / "summary.md", summary_markdown(summary_rows, targets, labels, suite.baseline))
    atomic_write(docs / "tuning.md", tuning_markdown(suite, tuning_rows))
    grids = {m.name: {k: v for k, v in m.grid} for m in suite.methods}
    atomic_write(docs / "suite.json", json.dumps({**meta, "grids": grids, "targets": targets}, indent=2, default=str) + "\n")
    paths += [docs / "summary.md", docs / "tuning.md", docs / "suite.json"]
    if summary_rows:
        paths.append(plot_pareto(summary_rows, targets, labels, docs / "pareto.png"))
    return paths


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------
def run_compare(
    suite_path: str | Path | None = None,
    *,
    tasks: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: int | None = None,
    jobs: int = 1,
    out: str | Path = "runs/compare",
    docs: str | Path | None = "docs/comparison",
    extra: list[str] | None = None,
    backend: str | None = None,
    report_only: bool = False,
    progress: ProgressFn = lambda s: None,
    runner: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Tune, run and aggregate (see the module docstring); returns the summary rows, targets and failures."""
    suite = load_suite(suite_path)
    tasks = list(suite.tasks) if not tasks or tasks == ["all"] else tasks
    for t in tasks:
        if t not in suite.tasks:
            raise ConfigError(f"--task {t}: not in the suite (tasks: {', '.join(suite.tasks)}, or all)")
    names = [m.name for m in suite.methods]
    methods = methods or names
    for m in methods:
        if m not in names:
            raise ConfigError(f"--methods {m}: not in the suite (methods: {', '.join(names)})")
    if suite.baseline not in methods:
        raise ConfigError(f"--methods must include the baseline {suite.baseline!r} (the target is defined by it)")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    seed_list = suite.seeds[:seeds] if seeds is not None and seeds <= len(suite.seeds) else (
        suite.seeds + [max(suite.seeds + [suite.tuning_seed]) + i + 1 for i in range((seeds or 0) - len(suite.seeds))])
    out = Path(out)
    extra = list(extra or [])
    t0 = time.perf_counter()
    tuning = plan_tuning(suite, tasks, methods, out, extra=extra, backend=backend)  # validates every config first
    failures = [] if report_only else execute_plan(tuning, jobs=jobs, progress=progress, runner=runner)
    choices, tuning_rows = choose(tuning, suite.tuning_window)
    missing = [f"{t}/{m}" for t in tasks for m in methods if (t, m) not in choices]
    if missing and not report_only:
        raise ValueError(f"no tuning run finished for {', '.join(missing)}; see the failures above")
    reported = plan_reported(suite, choices, seed_list, out, extra=extra, backend=backend)
    if not report_only:
        failures += execute_plan(reported, jobs=jobs, progress=progress, runner=runner)
    finished = [{"task": r.task, "method": r.method, "seed": r.seed, "run_dir": r.run_dir, "point": point_name(r.point)}
                for r in reported if (r.run_dir / "summary.json").is_file()]
    run_rows, summary_rows, targets = aggregate(finished, baseline=suite.baseline, target_fraction=suite.target_fraction)
    versions = sorted({json.loads((Path(r["run_dir"]) / DONE_FILE).read_text()).get("code_version", "unknown")
                       for r in finished if (Path(r["run_dir"]) / DONE_FILE).is_file()})
    meta = {"suite": str(suite.path), "tasks": tasks, "methods": methods, "seeds": seed_list,
            "tuning_seed": suite.tuning_seed, "budget": suite.budget, "backend": backend or suite.backend,
            "extra_overrides": extra, "code_versions": versions, "failures": failures,
            "wall_s": round(time.perf_counter() - t0, 1)}
    if docs is not None:
        write_outputs(suite, Path(docs), run_rows, summary_rows, targets, tuning_rows, meta)
    return {"summary": summary_rows, "runs": run_rows, "targets": targets, "failures": failures,
            "code_versions": versions, "tuning": tuning_rows}
