"""Run directories: config.yaml, metrics.csv (one row per round), summary.json, and plots.

Every file is written atomically (temporary file in the same directory, then ``os.replace``), so an
interrupted run never leaves a truncated CSV or JSON behind. ``report`` reads run directories back
and draws accuracy against rounds and against cumulative uplink bits with matplotlib.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

__all__ = ["atomic_write", "RunRecorder", "load_run", "report", "STANDARD_COLUMNS", "bits_to_reach"]

STANDARD_COLUMNS = [
    "round",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "uplink_bits",
    "downlink_bits",
    "total_bits",
    "wall_s",
]


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
    except OSError as exc:  # a full disk reports no file name: name the one being written
        if exc.filename is None and exc.strerror:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunRecorder:
    """Collects per-round rows, rewrites metrics.csv as they come and writes summary.json at the end.

    metrics.csv is rewritten (atomically) after a round when ``csv_interval_s`` seconds have passed since
    the last rewrite, and always by :meth:`flush` and :meth:`finish`: a rewrite costs ~3 ms (a temporary
    file and a rename), a tenth of a 10-client quickstart round, and a file that lags a live run by at
    most a second loses nothing (checkpoints carry their own rows; the run flushes on every exit).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], *, csv_interval_s: float = 1.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.config = config
        self.csv_interval_s = float(csv_interval_s)
        self._written = 0  # rows in metrics.csv
        self._last_write = -float("inf")
        atomic_write(self.run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))
        if time.monotonic() - self._last_write >= self.csv_interval_s:
            self._write_csv()

    def flush(self) -> None:
        """metrics.csv with every row added so far (a no-op when it has them)."""
        if self._written != len(self.rows):
            self._write_csv()

    def columns(self) -> list[str]:
        cols = list(STANDARD_COLUMNS)
        for row in self.rows:
            for k in row:
                if k not in cols:
                    cols.append(k)
        return cols

    def _write_csv(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns(), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in self.rows:
            w.writerow({k: ("" if _clean(v) is None else v) for k, v in row.items()})
        atomic_write(self.run_dir / "metrics.csv", buf.getvalue())
        self._written, self._last_write = len(self.rows), time.monotonic()

    def finish(self, extra: dict[str, Any]) -> dict[str, Any]:
        self.flush()
        last = self.rows[-1] if self.rows else {}
        evaluated = [r for r in self.rows if r.get("test_accuracy") is not None and _clean(r.get("test_accuracy")) is not None]
        summary = {
            "name": self.config.get("name") or self.run_dir.name,
            "rounds": len([r for r in self.rows if r.get("round", 0) > 0]),
            "final_test_accuracy": _clean(evaluated[-1]["test_accuracy"]) if evaluated else None,
            "final_test_loss": _clean(evaluated[-1]["test_loss"]) if evaluated else None,
            "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
            "total_uplink_bits": int(sum(r.get("uplink_bits") or 0 for r in self.rows)),
            "total_downlink_bits": int(sum(r.get("downlink_bits") or 0 for r in self.rows)),
            "total_bits": int(sum((r.get("uplink_bits") or 0) + (r.get("downlink_bits") or 0) for r in self.rows)),
            "wall_s": _clean(last.get("wall_s")),
            **{k: _clean(v) for k, v in extra.items()},
        }
        atomic_write(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """(summary, rows) of a run directory; raises FileNotFoundError naming what is missing."""
    d = Path(run_dir)
    metrics = d / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(f"{d}: no metrics.csv (is this an fl-sim run directory?)")
    rows = []
    try:
        with open(metrics, newline="", encoding="utf-8") as f:
            for line, raw in enumerate(csv.DictReader(f), start=2):
                if None in raw or None in raw.values():
                    raise ValueError(f"line {line} has {'more' if None in raw else 'fewer'} fields than the header")
                rows.append({k: (float(v) if v != "" else float("nan")) if k != "method" else v for k, v in raw.items()})
    except (ValueError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{metrics}: not a readable metrics file ({str(exc).splitlines()[0][:100]})") from None
    summary_path = d / "summary.json"
    summary: Any = {"name": d.name}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{summary_path}: not valid JSON ({str(exc).splitlines()[0][:100]})") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
    summary.setdefault("name", d.name)
    return summary, rows


def _finite(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(v) else 0.0


def bits_to_reach(rows: list[dict[str, float]], target_accuracy: float) -> float | None:
    """Cumulative uplink bits at the first evaluated round with accuracy >= target (None if never)."""
    return _sum_to_reach(rows, target_accuracy, "uplink_bits")


def _sum_to_reach(rows: list[dict[str, float]], target_accuracy: float, col: str) -> float | None:
    """Sum of ``col`` over rounds up to the first evaluated round with accuracy >= target (None if never)."""
    total = 0.0
    for r in rows:
        total += _finite(r.get(col))
        acc = r.get("test_accuracy")
        if acc is not None and math.isfinite(acc) and acc >= target_accuracy:
            return total
    return None


def report(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    cumulative: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Table rows and PNG plots for several runs.

    The table gives final accuracy, total uplink bits, and the uplink bits needed to reach 90% of the
    baseline's final accuracy (baseline = the run named ``baseline``, else one whose strategy is
    fedavg, else the first), and that figure's ratio to the baseline's own.

    ``cumulative``: more per-round metric columns (e.g. ``channel_uses``) to sum over rounds: each adds
    ``total_COL`` and ``COL_to_target`` (the sum up to the first round at the 90% target) to the table and
    a plot ``accuracy_vs_COL.png`` (accuracy against the running sum, log x); a run without the
    column gets blanks and no curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d), *load_run(d)) for d in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    base = None
    for d, summary, rows in runs:
        if baseline and summary.get("name") == baseline:
            base = (d, summary, rows)
    if base is None:
        for d, summary, rows in runs:
            if summary.get("strategy") == "fedavg":
                base = (d, summary, rows)
                break
    base = base or runs[0]
    target = 0.9 * (base[1].get("final_test_accuracy") or 0.0)
    base_bits = bits_to_reach(base[2], target)
    table = []
    for d, summary, rows in runs:
        reach = bits_to_reach(rows, target)
        table.append(
            {
                "run": summary.get("name", d.name),
                "strategy": summary.get("strategy", ""),
                "codec": summary.get("codec", ""),
                "rounds": summary.get("rounds"),
                "final_acc": summary.get("final_test_accuracy"),
                "uplink_bits": summary.get("total_uplink_bits"),
                "bits_to_target": reach,
                "savings_vs_base": (base_bits / reach) if (reach and base_bits) else None,
            }
        )
        for col in cumulative:
            has = any(col in r and math.isfinite(r[col]) for r in rows)
            table[-1][f"total_{col}"] = sum(_finite(r.get(col)) for r in rows) if has else None
            table[-1][f"{col}_to_target"] = _sum_to_reach(rows, target, col) if has else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    axes = [
        ("round", "accuracy_vs_round.png", "round", False),
        ("uplink_bits", "accuracy_vs_uplink_bits.png", "cumulative uplink bits", True),
    ] + [(col, f"accuracy_vs_{col}.png", f"cumulative {col.replace('_', ' ')}", True) for col in cumulative]
    for xkey, fname, xlabel, logx in axes:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for d, summary, rows in runs:
            if xkey != "round" and not any(xkey in r for r in rows):
                continue
            xs, ys, cum = [], [], 0.0
            for r in rows:
                cum += _finite(r.get(xkey)) if xkey != "round" else 0.0
                acc = r.get("test_accuracy")
                if acc is None or not math.isfinite(acc):
                    continue
                xs.append(r["round"] if xkey == "round" else max(cum, 1.0))
                ys.append(acc)
            ax.plot(xs, ys, marker=".", label=summary.get("name", d.name))
        if logx:
            ax.set_xscale("log")
        ax.axhline(target, color="gray", lw=0.8, ls=":", label="90% of baseline")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / fname
        tmp = out / f".{fname}.tmp.png"
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
        plt.close(fig)
        plots.append(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(table[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    atomic_write(out / "report.csv", buf.getvalue())
    return table, plots
