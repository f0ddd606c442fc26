"""The comparison suite's spec: tasks, methods, tuning grids, and the planned runs with their directories.

``load_suite`` reads and checks a suite YAML; ``compose_config`` builds one run's config from a task, a method
and a grid point; ``plan_tuning`` / ``plan_reported`` list the runs (``PlannedRun``) with their config hash.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fl_sim.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)

DONE_FILE = "suite_run.json"
KNOB = "knob"  # the pseudo grid key naming a method's knob variant

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
    step: str = ""  # the grid key extended on a log grid by bracketed tuning (default: the first grid key)
    knobs: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # variant -> task -> sets ("*": all tasks)

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """The grid's points in declared order (cartesian product of the keys' values), for every knob
        variant (``(KNOB, name)`` first in each point) when the method has any."""
        keys = [k for k, _ in self.grid]
        grid = [tuple(zip(keys, combo)) for combo in itertools.product(*[v for _, v in self.grid])]
        return [((KNOB, name), *pt) for name in self.knobs for pt in grid] if self.knobs else grid

    def point_sets(self, point: tuple[tuple[str, Any], ...], task: str) -> list[str]:
        """The overrides of a point on ``task``: a knob variant's ``key=value`` list for that task (sizes
        scale with the task's d), then the grid keys."""
        def knob(v: str) -> list[str]:
            per_task = self.knobs[v]
            return per_task.get(task, per_task.get("*", []))
        return [x for k, v in point for x in (knob(v) if k == KNOB else [f"{k}={_fmt_value(v)}"])]

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
    eval_tail: float = 0.2  # the last 20% of every run's rounds are evaluated every round (the held verdict reads them)
    bracket_factor: float = 2.0  # bracketed tuning: each added step value is the edge value x or / this factor
    bracket_cap: int = 0  # at most this many added points per method and task (0: the fixed grid only)

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
        step = str(m.get("step", grid[0][0] if grid else ""))
        if grid and step not in dict(grid):
            raise ConfigError(f"{p}: method {name}.step {step!r} is not one of its grid keys ({', '.join(k for k, _ in grid)})")
        if grid and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in dict(grid)[step]):
            raise ConfigError(f"{p}: method {name}: the step {step!r} needs positive numbers (it is extended on a log grid)")
        knobs_raw = m.get("knobs") or {}
        if not isinstance(knobs_raw, dict):
            raise ConfigError(f"{p}: method {name}.knobs must map variant names to lists of 'key=value' strings")
        knobs = {}
        for k, v in knobs_raw.items():
            per = v if isinstance(v, dict) else {"*": v}
            knobs[str(k)] = {str(t): _str_list(x, f"{p}: method {name}.knobs.{k}.{t}") for t, x in per.items()}
            unknown = set(knobs[str(k)]) - set(tasks) - {"*"}
            if unknown:
                raise ConfigError(f"{p}: method {name}.knobs.{k} names unknown tasks {sorted(unknown)} (tasks: {', '.join(tasks)})")
        meth = Method(name, _resolve(str(m["config"]), p), str(m.get("label", name)),
                      _str_list(m.get("set"), f"{p}: method {name}.set"), task_set, grid, step, knobs)
        n_points = len(meth.points()) // max(1, len(knobs))
        if n_points != budget:
            raise ConfigError(f"{p}: method {name!r} has {n_points} grid points (per knob variant) but the declared budget is {budget}; "
                              "every method gets the same number of tuning runs")
        methods.append(meth)
    seeds = [int(s) for s in raw.get("seeds", [1, 2, 3])]
    tuning_seed = int(raw.get("tuning_seed", 0))
    if tuning_seed in seeds:
        raise ConfigError(f"{p}: tuning_seed={tuning_seed} is one of the reported seeds {seeds}; use a distinct seed")
    suite = Suite(p, tasks, methods, seeds, tuning_seed, budget, str(raw.get("baseline", "fedavg")),
                  float(raw.get("target_fraction", 0.9)), int(raw.get("tuning_window", 3)),
                  str(raw.get("backend", "inline")), _str_list(raw.get("set"), f"{p}: set"), str(raw.get("title", "")),
                  float(raw.get("eval_tail", 0.2)))
    br = raw.get("bracket") or {}
    if not isinstance(br, dict) or set(br) - {"factor", "cap"}:
        raise ConfigError(f"{p}: bracket must be a mapping with 'factor' (> 1) and 'cap' (added points, >= 0)")
    suite.bracket_factor, suite.bracket_cap = float(br.get("factor", 2.0)), int(br.get("cap", 0))
    if not (suite.bracket_factor > 1.0 and suite.bracket_cap >= 0):
        raise ConfigError(f"{p}: bracket.factor={suite.bracket_factor} must be > 1 and bracket.cap={suite.bracket_cap} >= 0")
    if not 0.0 <= suite.eval_tail <= 1.0:
        raise ConfigError(f"{p}: eval_tail={suite.eval_tail} must be a fraction in [0, 1] (the last rounds evaluated every round)")
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
    the suite's ``eval_tail``, suite ``set``, task ``set``, method ``set``, the method's per-task ``set``, ``sets`` (grid point, seed),
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
    order = [f"eval_tail={suite.eval_tail}", *suite.set, *t.set, *m.set, *m.task_set.get(task, []), *sets, *extra,
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

def plan_point(suite: Suite, task: str, name: str, point: tuple[tuple[str, Any], ...], out: Path, *,
               extra: list[str] = (), backend: str | None = None) -> PlannedRun:
    """One tuning run: the grid point with the tuning seed, in OUT/TASK/tune/METHOD/POINT/seedS."""
    sets = suite.method(name).point_sets(point, task) + [f"seed={suite.tuning_seed}"]
    cfg = compose_config(suite, task, name, sets, extra=extra, backend=backend)
    run_dir = out / task / "tune" / name / point_name(point) / f"seed{suite.tuning_seed}"
    return PlannedRun(task, name, suite.tuning_seed, point, cfg, run_dir, "tune")

def plan_tuning(suite: Suite, tasks: list[str], methods: list[str], out: Path, *, extra: list[str] = (),
                backend: str | None = None) -> list[PlannedRun]:
    return [plan_point(suite, task, name, point, out, extra=extra, backend=backend)
            for task in tasks for name in methods for point in suite.method(name).points()]

def plan_reported(suite: Suite, choices: dict[tuple[str, str], tuple[tuple[str, Any], ...]], seeds: list[int],
                  out: Path, *, extra: list[str] = (), backend: str | None = None) -> list[PlannedRun]:
    plan = []
    for (task, name), point in choices.items():
        for s in seeds:
            sets = suite.method(name).point_sets(point, task) + [f"seed={s}"]
            cfg = compose_config(suite, task, name, sets, extra=extra, backend=backend)
            plan.append(PlannedRun(task, name, s, point, cfg, out / task / "runs" / name / f"seed{s}", "report"))
    return plan
