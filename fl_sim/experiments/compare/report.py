"""The comparison suite's report: the tuning choice, aggregation over seeds, tables and the Pareto figure.

``choose`` picks each method's grid point on validation accuracy; ``aggregate`` gives targets, bits to target
and savings paired by seed; ``write_outputs`` writes runs.csv, summary, tuning tables, pareto.png, suite.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from fl_sim.experiments.compare.spec import PlannedRun, Suite, point_name
from fl_sim.runs.results import atomic_write, bits_to_reach, load_run


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
