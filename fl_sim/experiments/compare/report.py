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
from fl_sim.runs.results import atomic_write, load_run


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

def held_from(rows: list[dict[str, float]], target: float) -> int | None:
    """Index of the row that starts the held stretch: the first evaluated round from which every later
    evaluation has test accuracy >= ``target``. A round without a test accuracy (blank in metrics.csv,
    read as NaN) was not evaluated and is skipped; an evaluation whose test loss is not finite (a diverged
    model still gets an argmax accuracy) counts as below. None: the last evaluation is below the target,
    so the run does not end at the target however often it touched it."""
    start = None
    for i, r in enumerate(rows):
        acc = r.get("test_accuracy")
        if acc is None or not math.isfinite(acc):
            continue  # not evaluated this round
        loss = r.get("test_loss")
        if acc >= target and (loss is None or math.isfinite(loss)):
            start = i if start is None else start
        else:
            start = None
    return start

def bits_to_held(rows: list[dict[str, float]], target: float, col: str = "uplink_bits") -> float | None:
    """Sum of ``col`` over rounds 0..the start of the held stretch (:func:`held_from`); None if not held."""
    i = held_from(rows, target)
    if i is None:
        return None
    return float(sum(r[col] for r in rows[: i + 1] if r.get(col) is not None and math.isfinite(r[col])))

def _stats(values: list[float]) -> tuple[float | None, float | None, float | None, float | None]:
    """Mean, min, max and the half-width of the 95% Student-t interval of the mean,
    t_{0.975, n-1} s / sqrt(n) with s the sample standard deviation (None for fewer than two values)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None, None
    n, mean = len(vals), sum(vals) / len(vals)
    half = None
    if n >= 2:
        from scipy.stats import t as student_t

        s = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = float(student_t.ppf(0.975, n - 1)) * s / math.sqrt(n)
    return mean, min(vals), max(vals), half

# The bit counts compared: (run-row prefix, metrics.csv per-round column, summary.json total)
DIRECTIONS = [("uplink", "uplink_bits", "total_uplink_bits"), ("downlink", "downlink_bits", "total_downlink_bits"),
              ("total", "total_bits", "total_bits")]

def _round_total(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Rows with ``total_bits`` = uplink + downlink where metrics.csv lacks the column."""
    return [r if r.get("total_bits") is not None else {**r, "total_bits": (r.get("uplink_bits") or 0.0) + (r.get("downlink_bits") or 0.0)}
            for r in rows]

def aggregate(runs: list[dict[str, Any]], *, baseline: str = "fedavg", target_fraction: float = 0.9,
              root: Path | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Per-run rows with bits to target, per-(task, method) summaries, and each task's target.

    ``runs``: dicts with task, method, seed, run_dir (a run directory with metrics.csv and summary.json).
    target[task] = target_fraction x mean over seeds of the baseline's final test accuracy. A run
    *reaches* the target when its test accuracy stays >= target from some evaluation to the end
    (:func:`held_from`); its bits to target (uplink, downlink and total) are summed over rounds up to the
    start of that held stretch (None if not held). Savings at seed s = baseline's bits to target at s / the
    method's at s, per direction (seeds where both held the target). Summaries give mean, min..max and the
    95% t-interval half-width over seeds. ``run_dir`` in the rows is relative to ``root`` when given.
    """
    loaded = []
    for r in runs:
        summary, rows = load_run(r["run_dir"])
        loaded.append((r, summary, _round_total(rows)))
    targets: dict[str, float] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        base = [s.get("final_test_accuracy") for r, s, _ in loaded if r["task"] == task and r["method"] == baseline]
        base = [b for b in base if b is not None]
        if not base:
            raise ValueError(f"task {task}: no finished run of the baseline {baseline!r}; the target is undefined")
        targets[task] = target_fraction * sum(base) / len(base)
    run_rows = []
    for r, summary, rows in loaded:
        target = targets[r["task"]]
        start = held_from(rows, target)
        row = {"task": r["task"], "method": r["method"], "seed": r["seed"],
               "final_accuracy": summary.get("final_test_accuracy"),
               "held_from_round": None if start is None else int(rows[start].get("round", start)), "target": target}
        for d, col, total in DIRECTIONS:
            tot = summary.get(total)
            row[f"total_{d}_bits" if d != "total" else "total_bits"] = (
                tot if tot is not None else sum(x.get(col) or 0.0 for x in rows))
            row[f"{d}_bits_to_target"] = bits_to_held(rows, target, col)
        if any(x.get("channel_uses") is not None for x in rows):  # a channel ledger (analog or digital over a channel)
            row["total_channel_uses"] = sum(x["channel_uses"] for x in rows
                                            if x.get("channel_uses") is not None and math.isfinite(x["channel_uses"]))
            row["channel_uses_to_target"] = bits_to_held(rows, target, "channel_uses")
        run_dir = Path(r["run_dir"])
        row.update({"rounds": summary.get("rounds"),
                    "final_val_accuracy": (_evaluated(rows, "val_accuracy") or [None])[-1],
                    "point": r.get("point", ""),
                    "run_dir": Path(os.path.relpath(run_dir, root)).as_posix() if root is not None else str(run_dir)})
        run_rows.append(row)
    for d, _, _ in DIRECTIONS:
        base_btt = {(x["task"], x["seed"]): x[f"{d}_bits_to_target"] for x in run_rows if x["method"] == baseline}
        for x in run_rows:
            b, m = base_btt.get((x["task"], x["seed"])), x[f"{d}_bits_to_target"]
            x[f"{d}_savings"] = (b / m) if (b and m) else None
    summary_rows = []
    for task, method in dict.fromkeys((x["task"], x["method"]) for x in run_rows):
        xs = [x for x in run_rows if x["task"] == task and x["method"] == method]
        out = {"task": task, "method": method, "seeds": len(xs),
               "reached": sum(x["uplink_bits_to_target"] is not None for x in xs), "target": targets[task]}
        cols = ["final_accuracy", "total_uplink_bits", "total_downlink_bits", "total_bits",
                *[f"{d}_bits_to_target" for d, _, _ in DIRECTIONS], *[f"{d}_savings" for d, _, _ in DIRECTIONS]]
        if any("total_channel_uses" in x for x in xs):
            cols += ["total_channel_uses", "channel_uses_to_target"]
        for c in cols:
            mean, lo, hi, half = _stats([x[c] for x in xs])
            out.update({f"{c}_mean": mean, f"{c}_min": lo, f"{c}_max": hi, f"{c}_ci95": half})
        out["point"] = xs[0]["point"]
        summary_rows.append(out)
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

def _ci(r: dict[str, Any], col: str, fmt: str, missing: str = "not reached") -> str:
    """``mean ± half-width`` of the 95% t-interval (``mean`` alone for one seed)."""
    mean, half = r.get(f"{col}_mean"), r.get(f"{col}_ci95")
    if mean is None:
        return missing
    return f"{mean:{fmt}}" + ("" if half is None else f" ± {half:{fmt}}")

def summary_markdown(summary_rows: list[dict[str, Any]], targets: dict[str, float], labels: dict[str, str],
                     baseline: str) -> str:
    """One table per task: mean ± 95% t-interval over seeds of final accuracy, total bits per direction,
    bits to the held target per direction (with how many seeds held it) and savings per direction."""
    lines = []
    base = labels.get(baseline, baseline)
    for task, target in targets.items():
        lines += [f"### {task} (target = {target:.3f}, held to the end)", "",
                  "| method | tuned | final accuracy | uplink bits | downlink bits | total bits | uplink bits to target "
                  f"(held) | total bits to target | savings vs {base}: uplink | downlink | total |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in summary_rows:
            if r["task"] != task:
                continue
            sav = [_ci(r, f"{d}_savings", ".2f", "-") + ("x" if r.get(f"{d}_savings_mean") is not None else "")
                   for d, _, _ in DIRECTIONS]
            tuned = r["point"] + (" (at cap)" if r.get("bracket") == "at cap" else "")
            if r.get("tuning_runs"):
                tuned += f", {r['tuning_runs']} runs"
            lines.append(f"| {labels.get(r['method'], r['method'])} | {tuned} | {_ci(r, 'final_accuracy', '.3f')} | "
                         f"{_ci(r, 'total_uplink_bits', '.3g')} | {_ci(r, 'total_downlink_bits', '.3g')} | "
                         f"{_ci(r, 'total_bits', '.3g')} | {_ci(r, 'uplink_bits_to_target', '.3g')} "
                         f"({r['reached']}/{r['seeds']}) | {_ci(r, 'total_bits_to_target', '.3g')} | {' | '.join(sav)} |")
        ledger = [r for r in summary_rows if r["task"] == task and r.get("total_channel_uses_mean") is not None]
        if ledger:
            lines += ["", "| method | channel uses | channel uses to target (held) |", "|---|---|---|"]
            lines += [f"| {labels.get(r['method'], r['method'])} | {_ci(r, 'total_channel_uses', '.3g')} | "
                      f"{_ci(r, 'channel_uses_to_target', '.3g')} ({r['reached']}/{r['seeds']}) |" for r in ledger]
        lines.append("")
    lines.append("Mean ± half-width of the 95% Student-t interval over seeds (bits to target and savings: over the "
                 "seeds that held the target). A run holds the target when its test accuracy stays at or above it "
                 "from one evaluation to the end; bits to target are counted to the start of that stretch.")
    return "\n".join(lines) + "\n"

def tuning_markdown(suite: Suite, tuning_rows: list[dict[str, Any]]) -> str:
    lines = [f"Grid: {suite.budget} points per method and task, then each method's step extended on a log grid "
             f"(x or / {suite.bracket_factor:g}, at most {suite.bracket_cap} added points, the same for every "
             "method) until the best point has a worse neighbour on both sides (bracketed) or the cap is hit "
             f"(at cap). Tuning seed {suite.tuning_seed} (reported seeds {', '.join(map(str, suite.seeds))}); "
             f"score = mean validation accuracy of the last {suite.tuning_window} evaluations; chosen in **bold**; "
             "every run used is listed.", "",
             "| task | method | grid point | validation score | bracket | runs used |", "|---|---|---|---|---|---|"]
    for r in tuning_rows:
        score = "missing" if r["val_score"] is None else f"{r['val_score']:.4f}"
        pt = f"**{r['point']}**" if r["chosen"] else r["point"]
        lines.append(f"| {r['task']} | {r['method']} | {pt} | {score} | {r.get('bracket', '')} | {r.get('tuning_runs', '')} |")
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

RUN_COLUMNS = ["task", "method", "seed", "final_accuracy", "total_uplink_bits", "total_downlink_bits", "total_bits",
               "uplink_bits_to_target", "downlink_bits_to_target", "total_bits_to_target", "held_from_round", "target",
               "uplink_savings", "downlink_savings", "total_savings", "total_channel_uses", "channel_uses_to_target",
               "final_val_accuracy", "rounds", "point", "run_dir"]

def write_outputs(suite: Suite, docs: Path, run_rows, summary_rows, targets, tuning_rows, meta: dict[str, Any]) -> list[Path]:
    labels = {m.name: m.label for m in suite.methods}
    docs.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_csv(docs / "runs.csv", run_rows, RUN_COLUMNS),
        _write_csv(docs / "summary.csv", summary_rows),
        _write_csv(docs / "tuning.csv", tuning_rows, ["task", "method", "point", "seed", "val_score", "chosen", "bracket",
                                                     "added", "tuning_runs"]),
    ]
    atomic_write(docs / "summary.md", summary_markdown(summary_rows, targets, labels, suite.baseline))
    atomic_write(docs / "tuning.md", tuning_markdown(suite, tuning_rows))
    grids = {m.name: {k: v for k, v in m.grid} for m in suite.methods}
    atomic_write(docs / "suite.json", json.dumps({**meta, "grids": grids, "targets": targets}, indent=2, default=str) + "\n")
    paths += [docs / "summary.md", docs / "tuning.md", docs / "suite.json"]
    if summary_rows:
        paths.append(plot_pareto(summary_rows, targets, labels, docs / "pareto.png"))
    return paths
