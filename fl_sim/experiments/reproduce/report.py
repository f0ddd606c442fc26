"""Paper reproductions' report: CSV and JSON writers and every figure (gain vs MSE, Theorem 7, weighted EF,
metric vs round, the Pareto front).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any

from fl_sim.experiments.reproduce.qcs_theory import qcs_theory_front
from fl_sim.runs.results import atomic_write


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")

def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in r.items()})
    atomic_write(path, buf.getvalue())
    return path

def _save(fig, path: Path, dpi: int = 100) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

def _plot_gain_mse(rows, s, n, path: Path) -> Path:
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    qcs = [r for r in rows if r["method"] == "qcs"]
    cmap = plt.get_cmap("viridis")
    levels = list(s["levels"])
    for i, Q in enumerate(levels):
        pts = sorted((r["gain"], r["rel_mse"]) for r in qcs if r["levels"] == Q)
        ax.plot(*zip(*pts), "o-", ms=3, lw=0.8, color=cmap(i / max(1, len(levels) - 1)), label=f"QCS Q={Q:g} (k varies)")
    front = qcs_theory_front(n, sorted(set(levels) | {0.5, 1, 2, 3, 4, 7, 8, 15}), wire=True)
    fg, fy = zip(*front)
    ax.step(fg, fy, where="post", color="k", lw=1, ls="--", label="QCS Theorem 7 gamma, best (k,Q)")
    style = {"qsgd": ("s", "tab:red", "QSGD (bucket n), s levels"), "randk": ("^", "tab:orange", "rand-k (unbiased)"),
             "topk": ("v", "tab:purple", "top-k (biased)"), "sign": ("D", "tab:brown", "scaled sign (biased)"),
             "terngrad": ("P", "tab:pink", "TernGrad")}
    for m, (mk, col, lab) in style.items():
        pts = sorted((r["gain"], r["rel_mse"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), mk + ("-" if len(pts) > 1 else ""), color=col, ms=5, lw=0.8, label=lab)
    qs = sorted((r["gain"], r["bound"]) for r in rows if r["method"] == "qsgd")
    ax.plot(*zip(*qs), ":", color="tab:red", lw=1, label="QSGD Lemma 3.1 bound min(n/s^2, sqrt(n)/s)")
    kk = np.array(sorted(s["randk"]), dtype=float)
    ax.plot(n / kk, n / kk - 1, ":", color="tab:orange", lw=1, label="rand-k n/k - 1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"compression gain 32 n / bits (exact wire bits, n = {n})")
    ax.set_ylabel("relative MSE  E||g - g_hat||^2 / ||g||^2")
    ax.set_title("Abdi Ch. 4 Fig. 4.1 analogue: Gaussian blocks", fontsize=9)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path

def _plot_theorem7(rows, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    levels = sorted({r["levels"] for r in rows})
    cmap = plt.get_cmap("plasma")
    for i, Q in enumerate(levels):
        col = cmap(i / max(1, len(levels)))
        rs = sorted((r for r in rows if r["levels"] == Q), key=lambda r: r["k"])
        ks = [r["k"] for r in rs]
        a1.plot(ks, [r["gamma"] for r in rs], "--", color=col, lw=1)
        a1.errorbar(ks, [r["unbiased_mse"] for r in rs], yerr=[2 * r["unbiased_se"] for r in rs], fmt="o-",
                    color=col, ms=3, lw=1, label=f"Q={Q:g}: measured (-- gamma 4.10)")
        a2.plot(ks, [r["mmse_mse"] for r in rs], "o-", color=col, ms=3, lw=1, label=f"Q={Q:g}: MMSE measured")
        a2.plot(ks, [r["mmse_bound"] for r in rs], "--", color=col, lw=0.8)
        a2.plot(ks, [r["oracle_mmse_mse"] for r in rs], ":", color=col, lw=0.8)
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("k (rows per block of n = 256)")
    a1.set_ylabel("Unbiased-QCS  E||e||^2/||g||^2")
    a1.set_title("Theorem 7: measured (o) vs gamma (--)", fontsize=9)
    a1.grid(alpha=0.3, which="both", lw=0.4)
    a1.legend(fontsize=6)
    a2.axhline(1.0, color="gray", lw=0.8)
    a2.set_xscale("log", base=2)
    a2.set_ylim(0, 1.08)
    a2.set_xlabel("k")
    a2.set_ylabel("MMSE-QCS  E||e||^2/||g||^2")
    a2.set_title("MMSE alpha=1/(gamma+1): measured (o), Lemma 8 gamma/(gamma+1) (--),\n"
                 "alpha from the measured gamma (:); unbiased is left panel (>1 for small k)", fontsize=8)
    a2.grid(alpha=0.3, which="both", lw=0.4)
    a2.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path

def _plot_ef(series, summary, gam, gam_emp, k, Q, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    cmap = plt.get_cmap("tab10")
    for i, srow in enumerate(summary):
        a, b = srow["alpha"], srow["beta"]
        pts = [(r["t"], r["residual_over_B"]) for r in series if r["alpha"] == a and r["beta"] == b]
        col = cmap(i % 10)
        ls = "-" if a == "unbiased" else "-."
        ax.plot(*zip(*pts), ls, color=col, lw=1.2, label=f"{a} beta={b:.3g}")
        if srow["lemma9_eta"] is not None:
            ax.axhline(srow["lemma9_eta"], color=col, lw=0.8, ls="--")
        ax.plot([r["t"] for r in series if r["alpha"] == a and r["beta"] == b],
                [r["predicted"] for r in series if r["alpha"] == a and r["beta"] == b], ":", color=col, lw=1)
    ax.set_yscale("log")
    top = 3 * max([x for r in summary for x in (r["lemma9_eta"], r["fixed_point_gamma_emp"]) if x is not None] + [1.0])
    ax.set_ylim(0.3, top)
    for srow in summary:
        if srow["diverged"]:
            ax.annotate(f"{srow['alpha']} beta={srow['beta']:.3g}: diverges, x{srow['growth_per_step']:.2f} per step "
                        f"(measured gamma {gam_emp:.2f} > 1)", (0.02, 0.95), xycoords="axes fraction", fontsize=7)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("||r_t||^2 / B   (B = E||g_t||^2)")
    ax.set_title(f"Weighted EF (4.14), QCS k={k}, Q={Q:g}, n=256: gamma={gam:.3f} (4.10), measured {gam_emp:.3f}\n"
                 "-- Lemma 9 eta (4.15)/(4.16);  : E||r_t||^2 from the same recursion with the measured gamma", fontsize=8)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path

def plot_metric_vs_round(
    run_dirs: list[Path], column: str, path: Path, *, reference: float | None = None,
    reference_label: str = "reference", logy: bool = False,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """A per-round metric (e.g. ``update_sparsity``) against the round for some runs, with an optional
    horizontal reference line (e.g. Tang's K/d); returns the PNG and per run {first, median, last,
    min, max} of the metric (rounds where it is finite)."""
    import numpy as np

    from fl_sim.runs.results import load_run

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    stats: dict[str, dict[str, float]] = {}
    for d in run_dirs:
        summary, rows = load_run(d)
        pts = [(r["round"], r[column]) for r in rows if column in r and math.isfinite(r[column])]
        if not pts:
            raise ValueError(f"{d}: no finite '{column}' in metrics.csv (was the run made before that metric existed?)")
        xs, ys = zip(*pts)
        name = str(summary.get("name", Path(d).name))
        ax.plot(xs, ys, marker=".", ms=3, label=name)
        v = np.asarray(ys)
        stats[name] = {"first": float(v[0]), "median": float(np.median(v)), "last": float(v[-1]),
                       "min": float(v.min()), "max": float(v.max())}
    if reference is not None:
        ax.axhline(float(reference), color="k", ls="--", lw=0.9, label=f"{reference_label} = {float(reference):.4g}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(column)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path, stats

def plot_pareto(table: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Final accuracy against total uplink bits (log x), one labelled point per run; the non-dominated
    points (no other run has at least the accuracy with at most the bits) joined by a line."""
    plt = _plt()
    pts = [(float(r["uplink_bits"]), float(r["final_acc"]), str(r["run"])) for r in table
           if r.get("final_acc") is not None and (r.get("uplink_bits") or 0) > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    placed: list[tuple[float, float]] = []
    for x, y, lab in pts:
        ax.plot(x, y, "o", ms=5)
        # runs that land on (almost) the same point get their labels stacked, not printed over each other
        near = sum(abs(math.log10(x) - u) < 0.05 and abs(y - v) < 0.01 for u, v in placed)
        placed.append((math.log10(x), y))
        ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3 - 9 * near), textcoords="offset points")
    front, best = [], -math.inf
    for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("total uplink bits")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title or "accuracy vs uplink bits", fontsize=9)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
