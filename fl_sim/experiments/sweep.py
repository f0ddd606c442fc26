"""Parameter sweeps: a grid of ``--set`` overrides × repeats, resumable, with sweep.csv and plots.

``fl-sim sweep CONFIG --grid channel.snr_db=0,5,10 --grid strategy.name=rlc,qcs --repeats 3`` runs
every combination for seeds seed, seed+1, ... (the point's seed: ``--grid seed=1,2 --repeats 2`` runs
seeds 1, 2 and 2, 3) into ``OUT/<key=value,...>/seed<s>/`` (keys and values
percent-encoded, so ``hf:/a/b`` and ``hf:/a_b`` get distinct directories). A point whose summary.json
carries the requested config's hash (:func:`fl_sim.runs.checkpoint.config_hash`) is not rerun; one that was
interrupted resumes from its checkpoint; one finished under other settings is rerun. ``sweep.csv`` has one row per run
(the grid values, the seed, final accuracy, total uplink bits, total channel uses, wall time), and
two PNGs show the final accuracy against the first grid key and accuracy against cumulative channel
uses (or uplink bits), as mean and spread (min..max) over repeats.

Runs use ``simulation.backend=vectorized`` (the config file's backend is overridden, as in ``fl-sim
reproduce``); ``--set simulation.backend=ray`` (or inline) chooses another.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from fl_sim.config import ConfigError, config_to_dict, load_config
from fl_sim.runs.checkpoint import config_hash
from fl_sim.runs.results import atomic_write, load_run

__all__ = ["parse_grid", "run_sweep", "plot_sweep", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "vectorized"  # sweeps run many small runs: batched clients, no engine start-up


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c=x"]`` -> [("a.b", ["1", "2"]), ("c", ["x"])] with clear errors."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise ConfigError(f"--grid {item!r}: expected key.sub=v1,v2,... for example --grid channel.snr_db=0,10")
        grid.append((key.strip(), vals))
    return grid


# Characters kept as they are in point directory names; everything else (``/``, ``%``, ``,``, ``=``,
# spaces, ...) is percent-encoded, so distinct points always get distinct names.
_SAFE = "[]:+@"
_MAX_NAME = 200  # directory names are at most 255 bytes on common filesystems


def _point_name(point: tuple[tuple[str, str], ...]) -> str:
    """Directory name of a grid point: ``key=value,...`` percent-encoded (injective), and for very long
    names a prefix plus a hash of the whole (still injective up to a 64-bit hash collision)."""
    from urllib.parse import quote

    name = ",".join(f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in point) or "base"
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 17]}~{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def _point_state(run_dir: Path, want: str) -> str:
    """``done`` (finished under the requested config: its summary's config_hash equals ``want``),
    ``resume`` (interrupted with a checkpoint of the requested config), ``changed`` (finished or
    started under another config) or ``new``."""
    from fl_sim.runs.checkpoint import latest_checkpoint

    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            stored = json.loads(summary.read_text()).get("config_hash")
        except (OSError, ValueError):
            stored = None
        return "done" if stored == want else "changed"
    try:
        ckpt = latest_checkpoint(run_dir)
    except (OSError, ValueError):
        ckpt = None
    if ckpt is not None and config_hash(ckpt.config) == want:
        return "resume"
    return "changed" if (run_dir / "config.yaml").exists() else "new"


def run_sweep(
    config: str | None,
    grid_items: list[str],
    out_dir: Path,
    *,
    repeats: int = 1,
    overrides: list[str] | None = None,
    runner: Callable | None = None,
    on_point: Callable[[str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the rows of sweep.csv."""
    from fl_sim.runs.simulation import run_experiment

    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: must be >= 1")
    runner = runner or run_experiment
    grid = parse_grid(grid_items)
    # Default backend: vectorized (fl_sim.engine.vectorized: the inline numbers, a round's clients batched); the
    # user's --set simulation.backend=... comes later and wins.
    overrides = [f"simulation.backend={DEFAULT_BACKEND}", *(overrides or [])]
    base = load_config(config, list(overrides or []))
    # Validate every point before running any (a typo must not surface after an hour).
    points = [tuple(zip([k for k, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    cfgs = []
    for point in points:
        sets = list(overrides or []) + [f"{k}={v}" for k, v in point]
        first = load_config(config, sets).seed  # the point's own seed: a grid over seed sets it
        for r in range(repeats):
            cfgs.append((point, first + r, load_config(config, sets + [f"seed={first + r}"])))
    rows = []
    for point, seed, cfg in cfgs:
        run_dir = Path(out_dir) / _point_name(point) / f"seed{seed}"
        state = _point_state(run_dir, config_hash(config_to_dict(cfg)))
        if on_point:
            on_point(_point_name(point), f"seed {seed}" + {"done": " (done, skipped)", "resume": " (resuming)",
                                                          "changed": " (config changed, rerunning)"}.get(state, ""))
        if state == "resume":
            runner(cfg, run_dir, resume=True)
        elif state != "done":
            runner(cfg, run_dir, overwrite=True)  # the point's directory is the sweep's own
        summary, metric_rows = load_run(run_dir)
        rows.append(
            {
                **{k: v for k, v in point},
                "seed": seed,
                "final_test_accuracy": summary.get("final_test_accuracy"),
                "total_uplink_bits": summary.get("total_uplink_bits"),
                "total_channel_uses": sum(r.get("channel_uses", 0.0) or 0.0 for r in metric_rows
                                          if not math.isnan(r.get("channel_uses", 0.0) or 0.0)),
                "wall_s": summary.get("wall_s"),
                "run_dir": str(run_dir),
            }
        )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(Path(out_dir) / "sweep.csv", buf.getvalue())
    atomic_write(Path(out_dir) / "sweep.json", json.dumps({"grid": grid, "repeats": repeats}, indent=2))
    plot_sweep(rows, [k for k, _ in grid], Path(out_dir))
    return rows


def _as_number(v: str) -> float | str:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], out_dir: Path) -> list[Path]:
    """Final accuracy vs the first grid key (one line per combination of the other keys), and
    accuracy vs cumulative channel uses (uplink bits when no channel is simulated) per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    x_key, group_keys = (keys[0], keys[1:]) if keys else ("seed", [])
    groups: dict[tuple, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        g = tuple(r[k] for k in group_keys)
        acc = r["final_test_accuracy"]
        if acc is not None:
            groups[g][_as_number(r[x_key])].append(float(acc))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g, by_x in sorted(groups.items(), key=lambda kv: str(kv[0])):
        xs = sorted(by_x, key=lambda v: (isinstance(v, str), v))
        mean = [np.mean(by_x[x]) for x in xs]
        lo = [np.min(by_x[x]) for x in xs]
        hi = [np.max(by_x[x]) for x in xs]
        label = ", ".join(f"{k}={v}" for k, v in zip(group_keys, g)) or "runs"
        ax.plot([str(x) if isinstance(x, str) else x for x in xs], mean, marker="o", label=label)
        if not any(isinstance(x, str) for x in xs):
            ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel(x_key)
    ax.set_ylabel("final test accuracy (mean, min..max over repeats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "sweep_accuracy.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    use_channel = any((r.get("total_channel_uses") or 0) > 0 for r in rows)
    per_point: dict[str, list[list[tuple[float, float]]]] = defaultdict(list)
    for r in rows:
        _, metric_rows = load_run(r["run_dir"])
        cum, curve = 0.0, []
        for m in metric_rows:
            step = m.get("channel_uses") if use_channel else m.get("uplink_bits")
            cum += 0.0 if step is None or math.isnan(step) else step
            acc = m.get("test_accuracy")
            if acc is not None and not math.isnan(acc):
                curve.append((max(cum, 1.0), acc))
        per_point[", ".join(f"{k}={r[k]}" for k in keys)].append(curve)
    for label, curves in sorted(per_point.items()):
        n = min(len(c) for c in curves)
        xs = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
        ys = np.array([[p[1] for p in c[:n]] for c in curves])
        ax.plot(xs, ys.mean(axis=0), label=label)
        if len(curves) > 1:
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative channel uses" if use_channel else "cumulative uplink bits")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(_save(fig, out_dir / ("sweep_accuracy_vs_channel_uses.png" if use_channel else "sweep_accuracy_vs_bits.png")))
    plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path
