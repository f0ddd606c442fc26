"""The comparison suite's runner: execute planned runs in worker processes (resumable), then tune, run and report.

``execute_plan`` skips a run whose ``suite_run.json`` holds the same config hash, so an interrupted suite
resumes; each worker keeps one torch thread. ``run_compare`` is the whole protocol (see the package docstring).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from fl_sim.config import ConfigError, config_from_dict, config_to_dict
from fl_sim.experiments.compare.report import aggregate, choose, write_outputs
from fl_sim.experiments.compare.spec import (
    DONE_FILE,
    PlannedRun,
    ProgressFn,
    _repo_root,
    config_hash,
    load_suite,
    plan_reported,
    plan_point,
    plan_tuning,
    point_name,
)
from fl_sim.experiments.compare.bracket import AT_CAP, BRACKETED, EXTENDING, bracket
from fl_sim.runs.results import atomic_write


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

def _portable(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine-specific prefix in the record)."""
    try:
        return Path(path).resolve().relative_to(_repo_root()).as_posix()
    except ValueError:
        return Path(path).name

def environment() -> dict[str, Any]:
    """What the numbers depend on besides the config: library versions, Python, CPU, threads, code commit."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    libs = {}
    for name in ("flwr", "torch", "numpy", "scipy"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            libs[name] = None
    from fl_sim.engine.vectorized import cpu_cores, cpu_model

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_repo_root(), capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "libraries": libs, "platform": platform.platform(),
            "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_cores_usable": cpu_cores(),
            "torch_threads_per_worker": 1, "cohort_threads_per_worker": "1 unless the config sets it",
            "torch_threads_driver": torch.get_num_threads(),
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "code_commit": commit, "code_version": code_version()}

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
                                            "torch_threads": torch.get_num_threads(),
                                            "cohort_threads": sim["cohort_threads"],
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
# Bracketed tuning
# ---------------------------------------------------------------------------------------------------
def tune(suite, tasks: list[str], methods: list[str], out: Path, *, extra: list[str] = (), backend: str | None = None,
         jobs: int = 1, progress: ProgressFn = lambda s: None, runner: Callable[..., Any] | None = None,
         report_only: bool = False) -> tuple[list[PlannedRun], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """The fixed grids, then bracketed extension (fl_sim.experiments.compare.bracket) of every method's step
    by the suite's ``bracket.factor`` up to ``bracket.cap`` added points, the same rule for every method.

    Returns every tuning run used (grid and added points), the failures, and per (task, method) the
    bracket status (``bracketed`` | ``at cap``), how many points were added and how many runs were used.
    With ``report_only`` nothing runs: added points count only where their run is already on disk.
    """
    plan = plan_tuning(suite, tasks, methods, out, extra=extra, backend=backend)  # validates every config first
    failures = [] if report_only else execute_plan(plan, jobs=jobs, progress=progress, runner=runner)
    added: dict[tuple[str, str], int] = {(t, m): 0 for t in tasks for m in methods}
    status: dict[tuple[str, str], str] = {}
    while True:
        choices, rows = choose(plan, suite.tuning_window)
        score = {(r["task"], r["method"], r["point"]): r["val_score"] for r in rows}
        new: list[PlannedRun] = []
        for key, best in choices.items():
            m = suite.method(key[1])
            if not m.step:
                status[key] = "no step"
                continue
            others = tuple((k, v) for k, v in best if k != m.step)
            line = [(dict(r.point)[m.step], score[(r.task, r.method, point_name(r.point))]) for r in plan
                    if (r.task, r.method) == key and tuple((k, v) for k, v in r.point if k != m.step) == others]
            st, values = bracket(line, dict(best)[m.step], suite.bracket_factor, added[key], suite.bracket_cap)
            status[key] = st
            for v in values:
                point = tuple((k, v if k == m.step else x) for k, x in best)
                new.append(plan_point(suite, key[0], key[1], point, out, extra=extra, backend=backend))
        if report_only:
            new = [r for r in new if (r.run_dir / "metrics.csv").is_file()]
        if not new:
            break
        for r in new:
            added[(r.task, r.method)] += 1
            progress(f"{r.task}/{r.method}: best point on the grid's edge, adding {point_name(r.point)}")
        if not report_only:
            failures += execute_plan(new, jobs=jobs, progress=progress, runner=runner)
        plan += new
    info = {key: {"bracket": AT_CAP if st == EXTENDING else st, "added": added[key],
                  "tuning_runs": sum((r.task, r.method) == key for r in plan)} for key, st in status.items()}
    return plan, failures, info

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
    tuning, failures, bracket_info = tune(suite, tasks, methods, out, extra=extra, backend=backend, jobs=jobs,
                                          progress=progress, runner=runner, report_only=report_only)
    choices, tuning_rows = choose(tuning, suite.tuning_window)
    for row in tuning_rows:
        row.update(bracket_info.get((row["task"], row["method"]), {}))
    missing = [f"{t}/{m}" for t in tasks for m in methods if (t, m) not in choices]
    if missing and not report_only:
        raise ValueError(f"no tuning run finished for {', '.join(missing)}; see the failures above")
    reported = plan_reported(suite, choices, seed_list, out, extra=extra, backend=backend)
    if not report_only:
        failures += execute_plan(reported, jobs=jobs, progress=progress, runner=runner)
    finished = [{"task": r.task, "method": r.method, "seed": r.seed, "run_dir": r.run_dir, "point": point_name(r.point)}
                for r in reported if (r.run_dir / "summary.json").is_file()]
    run_rows, summary_rows, targets = aggregate(finished, baseline=suite.baseline, target_fraction=suite.target_fraction,
                                                root=out)
    for row in summary_rows:
        row.update(bracket_info.get((row["task"], row["method"]), {}))
    marks = [json.loads((Path(r["run_dir"]) / DONE_FILE).read_text()) for r in finished
             if (Path(r["run_dir"]) / DONE_FILE).is_file()]
    versions = sorted({m.get("code_version", "unknown") for m in marks})
    threads = sorted({(m.get("torch_threads"), m.get("cohort_threads")) for m in marks}, key=str)
    meta = {"suite": _portable(suite.path), "tasks": tasks, "methods": methods, "seeds": seed_list,
            "tuning_seed": suite.tuning_seed, "budget": suite.budget, "backend": backend or suite.backend,
            "eval_tail": suite.eval_tail, "jobs": jobs,
            "bracket": {"factor": suite.bracket_factor, "cap": suite.bracket_cap},
            "extra_overrides": extra, "code_versions": versions,
            "environment": {**environment(), "threads_of_reported_runs": [{"torch": t, "cohort": c} for t, c in threads]}, "failures": failures,
            "wall_s": round(time.perf_counter() - t0, 1)}
    if docs is not None:
        write_outputs(suite, Path(docs), run_rows, summary_rows, targets, tuning_rows, meta)
    return {"summary": summary_rows, "runs": run_rows, "targets": targets, "failures": failures,
            "code_versions": versions, "tuning": tuning_rows}
