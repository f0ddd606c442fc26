"""Paper reproductions' runner: ``reproduce(NAME)`` dispatches to the experiment's kind; the ``runs`` kind runs
fl-sim configs (resumable) and reports them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fl_sim.experiments.reproduce import qcs_codec  # noqa: F401 - registers the qcs_codec kind
from fl_sim.experiments.reproduce.report import (
    _json_default,
    plot_metric_vs_round,
    plot_pareto,
)
from fl_sim.experiments.reproduce.spec import (
    EXPERIMENT_KINDS,
    ProgressFn,
    load_spec,
    merged_settings,
    register_kind,
)
from fl_sim.runs.results import atomic_write


def _own_output(out_dir: Path, spec: dict[str, Any], full: bool) -> bool:
    """Whether ``out_dir`` holds only this experiment's (and version's) earlier output, which a rerun replaces."""
    from fl_sim.runs.rundir import holds_run

    if set(holds_run(out_dir)) - {"summary.json"}:
        return False  # an fl-sim run's config/metrics/model/checkpoints
    try:
        earlier = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(earlier, dict) and earlier.get("experiment") == spec["name"]
            and earlier.get("version") == ("full" if full else "reduced"))


def reproduce(
    name: str | Path, *, full: bool = False, out: str | Path | None = None, progress: ProgressFn | None = None,
    overwrite: bool = False, **kw
) -> dict[str, Any]:
    """Run one experiment (reduced unless ``full``); returns and writes OUT/summary.json.

    OUT is refused, as ``fl-sim run --out`` refuses it, when it holds something else's results (an fl-sim
    run, another experiment's or version's reproduction) unless ``overwrite``, which deletes that run's
    files first; this experiment's own earlier output is replaced (its runs resume). OUT is locked while
    the reproduction writes it (:func:`fl_sim.runs.rundir.claim`)."""
    from fl_sim.runs.rundir import RunDirOccupied, claim, holds_run

    spec = load_spec(name)
    settings = merged_settings(spec, full)
    out_dir = Path(out) if out else Path("runs") / "reproduce" / (spec["name"] + ("-full" if full else ""))
    present = holds_run(out_dir) if out_dir.is_dir() else []
    if present and not overwrite and not _own_output(out_dir, spec, full):
        raise RunDirOccupied(
            f"{out_dir} already holds other results ({', '.join(present)}): choose a fresh --out, or pass "
            "--overwrite to replace them"
        )
    with claim(out_dir, overwrite=True):
        return _reproduce(spec, settings, full, out_dir, progress, **kw)


def _reproduce(spec: dict[str, Any], settings: dict[str, Any], full: bool, out_dir: Path,
               progress: ProgressFn | None, **kw) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = EXPERIMENT_KINDS[spec["kind"]](spec, settings, out_dir, progress=progress or (lambda s: None), **kw)
    summary = {
        "experiment": spec["name"],
        "kind": spec["kind"],
        "version": "full" if full else "reduced",
        "title": spec.get("title", ""),
        "paper": spec.get("paper", ""),
        "claims": spec.get("claims", []),
        "settings": settings,
        "wall_s": round(time.perf_counter() - t0, 2),
        **result,
    }
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary

# ---------------------------------------------------------------------------------------------------
# Lists of fl-sim runs
# ---------------------------------------------------------------------------------------------------
def _resolve_config(path: str, spec_path: Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    root = spec_path.resolve().parent.parent.parent  # configs/papers/x.yaml -> the folder holding configs/
    for cand in (root / path, spec_path.resolve().parent / path):
        if cand.is_file():
            return cand
    from fl_sim.config import ConfigError, packaged_config

    try:
        return packaged_config(path)  # configs/x.yaml of the shipped configs
    except ConfigError:
        pass
    raise FileNotFoundError(f"{spec_path}: run config {path!r} not found (relative to . or {root})")

# The papers' algorithms have no server-side reply guards, and a reproduction's clients are all honest: the
# relative bounds (10 x the round's median update norm, method scalar and num-examples) met honest clients on
# skewed data (fl-sim compare's image task: 0.2-1.6% of FedAvg's replies dropped; DaQuSGD clients with a high mean
# sent loss rejected), a silent departure from the paper. Off in reproductions, as in fl-sim compare; an
# experiment's own ``set`` (or its entry's) turns them back on. The exact checks (malformed payloads, a
# num-examples above the client's true partition size) stay: they never meet an honest reply.
HONEST_CLIENTS = ("strategy.guards.norm_bound=null", "strategy.guards.scalar_bound=null",
                  "strategy.guards.weight_cap=null")

@register_kind("runs")
def run_runs(
    spec: dict[str, Any], s: dict[str, Any], out: Path, *, progress: ProgressFn, runner: Callable | None = None
) -> dict[str, Any]:
    """Run every entry of ``spec['runs']`` ({config, name?, set?}) into OUT/runs/NAME (resumable), then report.

    Overrides, in order: ``simulation.backend=vectorized`` (fl_sim.engine.vectorized: the inline backend's numbers,
    a round's clients trained in batches), :data:`HONEST_CLIENTS` (the relative reply guards off), the
    settings' ``set``, the entry's ``set``,
    ``name=NAME``. A run whose summary.json exists with the same config.yaml (up to
    fl_sim.runs.checkpoint.ENGINE_KEYS: a run made with another backend counts) is not rerun. All configs
    are validated before the first run starts.
    """
    from fl_sim.config import config_to_dict, load_config
    from fl_sim.runs.checkpoint import (
        config_differences,  # engine keys (backend, ...) aside: the same numbers
    )
    from fl_sim.runs.results import report

    entries = spec.get("runs") or []
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{spec['_path']}: 'runs' must be a non-empty list of {{config: PATH, name: ..., set: [...]}}")
    plan, names = [], set()
    for e in entries:
        e = {"config": e} if isinstance(e, str) else dict(e)
        if "config" not in e:
            raise ValueError(f"{spec['_path']}: every entry of 'runs' needs a 'config' path")
        cfg_path = _resolve_config(e["config"], Path(spec["_path"]))
        name = str(e.get("name") or Path(e["config"]).stem)
        if name in names:
            raise ValueError(f"{spec['_path']}: two runs are named {name!r}; give each a distinct 'name'")
        names.add(name)
        sets = ["simulation.backend=vectorized", *HONEST_CLIENTS, *s.get("set", []), *e.get("set", []), f"name={name}"]
        plan.append((name, load_config(cfg_path, sets)))
    if runner is None:
        from functools import partial

        from fl_sim.runs.simulation import run_experiment

        runner = partial(run_experiment, overwrite=True)  # OUT/runs/NAME is this experiment's own; rerun replaces
    run_dirs = []
    for name, cfg in plan:
        run_dir = out / "runs" / name
        done = (run_dir / "summary.json").is_file() and (run_dir / "config.yaml").is_file() and not (
            config_differences(yaml.safe_load((run_dir / "config.yaml").read_text()), config_to_dict(cfg)))
        progress(f"{name}: {'done, skipped' if done else f'{cfg.rounds} rounds'}")
        if not done:
            runner(cfg, run_dir)
        run_dirs.append(run_dir)
    table, plots = report(run_dirs, out, baseline=s.get("baseline"), cumulative=s.get("cumulative", []))
    plots.append(plot_pareto(table, out / "pareto.png", title=spec.get("title", "")))
    result: dict[str, Any] = {"runs": table}
    for mp in s.get("metric_plots", []):
        by_name = dict(zip([n for n, _ in plan], run_dirs))
        wanted = mp.get("runs") or [n for n, _ in plan]
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"{spec['_path']}: metric_plots names runs {missing} that are not in 'runs'")
        col = str(mp["column"])
        path, stats = plot_metric_vs_round(
            [by_name[n] for n in wanted], col, out / f"{col}_vs_round.png",
            reference=mp.get("reference"), reference_label=str(mp.get("reference_label", "reference")),
            logy=bool(mp.get("logy", False)),
        )
        plots.append(path)
        result[col] = stats
    result["plots"] = [p.name for p in plots]
    return result
