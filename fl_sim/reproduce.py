"""Paper reproductions: ``fl-sim reproduce NAME [--full] [--out DIR]``.

An experiment is a YAML file in ``configs/papers/`` (NAME is its stem, or give a path). Its ``kind``
picks a runner registered here; ``reduced:`` holds the settings of the reduced version (minutes on a
2-core machine), ``full:`` what the full version changes (merged over ``reduced``; ``set`` lists are
appended). Every runner writes CSV + PNG per sub-experiment and ``summary.json`` (the key numbers)
into the output directory (default ``runs/reproduce/NAME`` or ``NAME-full``).

Kinds:

* ``qcs_codec`` -- Abdi thesis (shared/papers/002_5a8bb245d2c84ca1.txt) Ch. 4 at the codec level,
  papers/NOTES.md §3.1 / §3.3 / §6:
    - gain vs MSE (Fig. 4.1): relative MSE E||g - g_hat||^2 / ||g||^2 against the compression gain
      32 n / bits for QCS over a (k, Q) grid, QSGD levels, top-k, rand-k, sign, TernGrad, on blocks
      of n coordinates; with the theory curves gamma (4.10), QSGD's Lemma 3.1 bound, rand-k's n/k - 1;
    - Theorem 7: empirical MSE of Unbiased-QCS against gamma (4.10) for several k and Q, and an
      unbiasedness check over repeated seeds;
    - alpha: Unbiased-QCS (4.9) against MMSE-QCS (4.12), Lemma 8's bound gamma/(gamma + 1);
    - weighted EF (4.14): ||r_t||^2 / B along a fixed stream of vectors for several beta, against
      Lemma 9's eta (4.15)/(4.16) and the same recursion evaluated with the measured gamma.
* ``runs`` -- a list of fl-sim configs (``simulation.backend=vectorized`` and the relative reply guards off,
  :data:`HONEST_CLIENTS`, unless overridden), resumable,
  then :func:`fl_sim.results.report` (accuracy vs round / vs uplink bits, report.csv) and a Pareto
  figure: final accuracy against total uplink bits (log scale), one point per method. Optional
  settings: ``cumulative: [channel_uses]`` (more running-sum x axes and totals in report.csv, see
  ``report``) and ``metric_plots: [{column, runs, reference, reference_label, logy}]`` (a per-round
  metric against the round, e.g. Tang's ``update_sparsity`` with the K/d line).

All randomness comes from :mod:`fl_sim.rng` generators seeded by (seed, purpose, ids).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .results import atomic_write

__all__ = [
    "EXPERIMENT_KINDS",
    "register_kind",
    "papers_dir",
    "list_experiments",
    "load_spec",
    "merged_settings",
    "reproduce",
    "codec_block_errors",
    "qcs_theory_front",
    "best_qcs_parameters",
    "run_qcs_codec",
    "run_runs",
    "plot_pareto",
    "plot_metric_vs_round",
]

ProgressFn = Callable[[str], None]
EXPERIMENT_KINDS: dict[str, Callable[..., dict[str, Any]]] = {}
FLOAT_BITS = 32


def register_kind(name: str):
    """Decorator: ``@register_kind("runs")`` makes a runner ``fn(spec, settings, out, progress=...)`` available."""

    def deco(fn):
        EXPERIMENT_KINDS[name] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------------
def papers_dir() -> Path:
    """configs/papers/ of the working directory if present, else the shipped one (fl_sim/configs/papers)."""
    from .config import config_dir

    local = Path("configs") / "papers"
    if local.is_dir():
        return local
    return config_dir() / "papers"


def list_experiments() -> list[tuple[str, str, str]]:
    """(name, kind, title) of every experiment in :func:`papers_dir`."""
    out = []
    for p in sorted(papers_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            raw = {}
        out.append((p.stem, str(raw.get("kind", "?")), str(raw.get("title", ""))))
    return out


def _spec_path(name: str | Path) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    from .config import config_dir

    for base in (papers_dir(), config_dir() / "papers"):
        cand = base / f"{stem}.yaml"
        if cand.is_file():
            return cand
    known = ", ".join(n for n, _, _ in list_experiments()) or "none"
    raise FileNotFoundError(f"no experiment {str(name)!r} in {papers_dir()} (known: {known}); or give a YAML path")


def load_spec(name: str | Path) -> dict[str, Any]:
    """The experiment's YAML as a dict, checked (name, kind registered, reduced/full mappings)."""
    path = _spec_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with name, kind, reduced, full")
    kind = raw.get("kind")
    if kind not in EXPERIMENT_KINDS:
        raise ValueError(f"{path}: kind={kind!r} is not one of {', '.join(sorted(EXPERIMENT_KINDS))}")
    for key in ("reduced", "full"):
        if not isinstance(raw.get(key) or {}, dict):
            raise ValueError(f"{path}: '{key}' must be a mapping of settings")
    raw.setdefault("name", path.stem)
    raw["_path"] = str(path)
    return raw


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if k == "set" and isinstance(out.get(k), list) and isinstance(v, list):
            out[k] = list(out[k]) + list(v)  # later overrides win
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def merged_settings(spec: dict[str, Any], full: bool) -> dict[str, Any]:
    """``reduced`` settings, with ``full`` merged over them when ``full`` (``set`` lists appended)."""
    base = dict(spec.get("reduced") or {})
    return _merge(base, dict(spec.get("full") or {})) if full else base


def _own_output(out_dir: Path, spec: dict[str, Any], full: bool) -> bool:
    """Whether ``out_dir`` holds only this experiment's (and version's) earlier output, which a rerun replaces."""
    from .rundir import holds_run

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
    the reproduction writes it (:func:`fl_sim.rundir.claim`)."""
    from .rundir import RunDirOccupied, claim, holds_run

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


# ---------------------------------------------------------------------------------------------------
# Codec-level measurements (Abdi Ch. 4)
# ---------------------------------------------------------------------------------------------------
BLOCKWISE_CODECS = ("qcs",)  # codecs that cut a long vector into n-blocks themselves (one call for all blocks)


def codec_block_errors(name: str, params: dict[str, Any], G, seed: int):
    """Encode/decode every row g_b of G (B x n) with the real codec; returns (G_hat, rel_err, bits per block).

    rel_err_b = ||g_b - g_hat_b||^2 / ||g_b||^2 (float64, shape (B,)). Blockwise codecs (QCS) take the B
    rows as one vector of B*n coordinates with ``block=n`` (independent signs, rows and dither per block);
    the others run once per row at dim n with seed derive_seed(seed, name, b).
    """
    import torch

    from .compression.base import make_codec
    from .rng import derive_seed

    B, n = G.shape
    if name in BLOCKWISE_CODECS:
        codec = make_codec(name, dim=B * n, block=n, **params)
        s = derive_seed(seed, name, "blocks")
        p = codec.encode(G.reshape(-1), seed=s)
        H = codec.decode(p, seed=s).view(B, n)
        bits = p.bits / B
    else:
        codec = make_codec(name, dim=n, **params)
        rows, total = [], 0
        for b in range(B):
            s = derive_seed(seed, name, b)
            p = codec.encode(G[b], seed=s)
            rows.append(codec.decode(p, seed=s))
            total += p.bits
        H, bits = torch.stack(rows), total / B
    g64 = G.to(torch.float64)
    err = ((H.to(torch.float64) - g64) ** 2).sum(1) / (g64**2).sum(1).clamp_min(1e-300)
    return H, err, float(bits)


def _gaussian_blocks(seed: int, purpose: str, blocks: int, n: int):
    """B x n i.i.d. N(0, 1) rows (the test vectors; NOTES §6's Monte-Carlo uses Gaussian vectors too)."""
    import torch

    from .rng import torch_generator

    return torch.randn(blocks, n, generator=torch_generator(seed, "reproduce", purpose), dtype=torch.float32)


def _mean_se(err) -> tuple[float, float]:
    m = float(err.mean())
    se = float(err.std(unbiased=True)) / math.sqrt(err.numel()) if err.numel() > 1 else 0.0
    return m, se


def _qcs_wire_bits(n: int, k: int, levels: float) -> int:
    """Exact bits per block of the qcs codec: a float32 scale + k ceil(log2(2Q+1))-bit indices."""
    from .compression.quantizers import level_bits

    return FLOAT_BITS + k * level_bits(levels)


def _qcs_table(n: int, levels, wire: bool):
    """(gain, gamma, k, Q) arrays over k = 2..n and Q in ``levels``: gamma of (4.10), gain (4.11) or exact."""
    import numpy as np

    from .compression.quantizers import level_bits

    k = np.arange(2, n + 1, dtype=np.float64)
    gains, gammas, ks, qs = [], [], [], []
    for Q in levels:
        bits = FLOAT_BITS + k * level_bits(Q) if wire else k * math.log2(2 * Q + 1)
        gains.append(FLOAT_BITS * n / bits)
        gammas.append(n / k - 1 + (n / (4.0 * Q * Q)) * np.log(k) / (k - 1))  # (4.10), k >= 2
        ks.append(k)
        qs.append(np.full_like(k, Q))
    return tuple(np.concatenate(a) for a in (gains, gammas, ks, qs))


def best_qcs_parameters(n: int, gain: float, *, levels=None, wire: bool = False) -> dict[str, float]:
    """argmin over (k, Q) of gamma (4.10) subject to gain >= ``gain`` (NOTES §6's table).

    Gain is eq. (4.11), 32 n / (k log2(2Q + 1)), or with ``wire`` the codec's exact 32 n / bits
    (fixed-length indices and the 32-bit scale). Q ranges over ``levels`` (default: 1..64, as NOTES;
    add 0.5 for the 1-bit variant), k over 2..n.
    """
    import numpy as np

    g, gam, k, q = _qcs_table(n, list(levels or range(1, 65)), wire)
    ok = g >= gain
    if not ok.any():
        raise ValueError(f"no (k, Q) reaches gain {gain} at n={n}")
    i = int(np.argmin(np.where(ok, gam, np.inf)))
    Q = float(q[i])
    return {"k": int(k[i]), "levels": int(Q) if Q.is_integer() else Q, "gamma": float(gam[i]), "gain": float(g[i])}


def qcs_theory_front(n: int, levels, *, wire: bool = True) -> list[tuple[float, float]]:
    """Lower envelope of gamma (4.10) over (k, Q) against gain: [(gain, min gamma at gain >= it)], gain
    strictly descending, gamma strictly descending."""
    import numpy as np

    g, gam, _, _ = _qcs_table(n, list(levels), wire)
    order = np.lexsort((gam, -g))  # gain descending, then gamma ascending
    front: list[tuple[float, float]] = []
    for i in order:
        if not front or gam[i] < front[-1][1]:
            if front and g[i] == front[-1][0]:
                front[-1] = (float(g[i]), float(gam[i]))
            else:
                front.append((float(g[i]), float(gam[i])))
    return front


def _gain_vs_mse(s: dict[str, Any], seed: int, out: Path, progress: ProgressFn) -> dict[str, Any]:
    """Fig. 4.1 analogue: every codec on the same B blocks of n Gaussian coordinates."""
    from .compression.codecs.qcs import qcs_gamma
    from .compression.quantizers import qsgd_variance_bound

    n, B = int(s["block"]), int(s["blocks"])
    G = _gaussian_blocks(seed, "gain-mse", B, n)
    rows: list[dict[str, Any]] = []

    def add(method, params, bound, biased, **extra):
        _, err, bits = codec_block_errors(method, params, G, seed)
        m, se = _mean_se(err)
        rows.append({"method": method, **extra, "bits_per_block": bits, "gain": FLOAT_BITS * n / bits,
                     "rel_mse": m, "rel_mse_se": se, "bound": bound, "biased": biased})

    progress(f"gain vs MSE: QCS grid ({len(s['ks'])} k x {len(s['levels'])} Q) on {B} blocks of {n}")
    for Q in s["levels"]:
        for k in s["ks"]:
            add("qcs", {"k": k, "levels": Q}, qcs_gamma(n, k, Q), False, k=k, levels=Q,
                gain_thesis=FLOAT_BITS * n / (k * math.log2(2 * Q + 1)))
    progress("gain vs MSE: QSGD, top-k, rand-k, sign, TernGrad")
    for sl in s["qsgd_levels"]:
        add("qsgd", {"levels": sl}, qsgd_variance_bound(n, sl), False, levels=sl)
    for k in s["topk"]:
        add("topk", {"k": k}, None, True, k=k)
    for k in s["randk"]:
        add("randk", {"k": k, "unbiased": True}, n / k - 1.0, False, k=k)
    add("sign", {}, None, True)
    add("terngrad", {}, None, True)  # biased: the paper's 2.5-sigma clipping is on by default
    _write_csv(out / "gain_mse.csv", rows)

    # Pareto fronts of the measurements and the QCS-vs-QSGD ratio at equal (or higher) gain.
    qcs = [r for r in rows if r["method"] == "qcs"]
    ratios = []
    for r in (r for r in rows if r["method"] == "qsgd"):
        better = [q for q in qcs if q["gain"] >= r["gain"]]
        if better:
            q = min(better, key=lambda q: q["rel_mse"])
            ratios.append({"qsgd_levels": r["levels"], "gain": r["gain"], "qsgd_rel_mse": r["rel_mse"],
                           "qcs_k": q["k"], "qcs_levels": q["levels"], "qcs_gain": q["gain"],
                           "qcs_rel_mse": q["rel_mse"], "ratio": r["rel_mse"] / q["rel_mse"]})
    _plot_gain_mse(rows, s, n, out / "gain_mse.png")
    return {"rows": len(rows), "qsgd_over_qcs_at_equal_gain": ratios,
            "max_qsgd_gain": max(r["gain"] for r in rows if r["method"] == "qsgd")}


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


def _theorem7_alpha(s: dict[str, Any], seed: int, out: Path, progress: ProgressFn) -> dict[str, Any]:
    """Unbiased-QCS MSE vs gamma (Theorem 7), MMSE-QCS vs Lemma 8, and an unbiasedness check."""
    import torch

    from .compression.codecs.qcs import qcs_gamma
    from .rng import derive_seed

    n, B = int(s["block"]), int(s["blocks"])
    G = _gaussian_blocks(seed, "theorem7", B, n)
    rows = []
    progress(f"Theorem 7 / Lemma 8: {len(s['theorem_ks'])} k x {len(s['theorem_levels'])} Q, both alphas")
    for Q in s["theorem_levels"]:
        for k in s["theorem_ks"]:
            gam = qcs_gamma(n, k, Q)
            _, eu, bits = codec_block_errors("qcs", {"k": k, "levels": Q, "alpha": "unbiased"}, G, seed)
            _, em, _ = codec_block_errors("qcs", {"k": k, "levels": Q, "alpha": "mmse"}, G, seed)
            mu, seu = _mean_se(eu)
            mm, sem = _mean_se(em)
            rows.append({"k": k, "levels": Q, "gamma": gam, "unbiased_mse": mu, "unbiased_se": seu,
                         "unbiased_over_gamma": mu / gam, "mmse_bound": gam / (gam + 1), "mmse_mse": mm,
                         "mmse_se": sem, "oracle_mmse_mse": mu / (mu + 1), "gain": FLOAT_BITS * n / bits})
    _write_csv(out / "theorem7.csv", rows)

    # Unbiasedness (Theorem 7 P1): mean of S decodes of the same blocks under S seeds. For an unbiased
    # codec E||mean - g||^2 = mse / S, so S ||mean - g||^2 / (S_mse) ~ 1 (a ratio >> 1 means bias).
    S, Bu = int(s["unbiased_repeats"]), int(s["unbiased_blocks"])
    Gu = G[:Bu]
    bias_rows = []
    for Q in s["unbiased_levels"]:
        k = int(s["unbiased_k"])
        acc = torch.zeros_like(Gu, dtype=torch.float64)
        mse = 0.0
        for r in range(S):
            H, e, _ = codec_block_errors("qcs", {"k": k, "levels": Q}, Gu, derive_seed(seed, "unbiased", r))
            acc += H.to(torch.float64)
            mse += float(e.mean()) / S
        mean = acc / S
        dev = float((((mean - Gu.to(torch.float64)) ** 2).sum(1) / (Gu.to(torch.float64) ** 2).sum(1)).mean())
        bias_rows.append({"k": k, "levels": Q, "repeats": S, "mse": mse, "mean_dev": dev, "ratio": dev * S / mse})
    _write_csv(out / "unbiasedness.csv", bias_rows)
    _plot_theorem7(rows, out / "theorem7.png")
    return {"theorem7": rows, "unbiasedness": bias_rows}


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


def _ef_recursion(gamma_emp: float, gamma_bound: float, beta: float, alpha: str) -> tuple[float, float]:
    """(c, s) with E||r_{t+1}||^2 = s E||r_t||^2 + c B under (4.14), g_t i.i.d. zero-mean, E||g_t||^2 = B,
    when the codec's error is exactly E||z - z_hat_u||^2 = gamma_emp ||z||^2 (z_hat_u: the unbiased decode).

    Unbiased (alpha = 1): c = gamma_emp, s = (1-b)^2 + b^2 gamma_emp; the fixed point c/(1-s) is Lemma 9's
    (4.15) with gamma_emp in place of gamma. MMSE (alpha = 1/(gamma+1), gamma of 4.10): z_hat = alpha z_hat_u,
    e = (1-alpha) z + alpha (z - z_hat_u), c = (1-alpha)^2 + alpha^2 gamma_emp, and the biased part adds
    2 (1-b) b (1-alpha) to s (E[g^T r] = 0 still, as g_t is independent of r_t).
    """
    a = 1.0 if alpha == "unbiased" else 1.0 / (gamma_bound + 1.0)
    c = (1 - a) ** 2 + a * a * gamma_emp
    return c, (1 - beta) ** 2 + c * beta**2 + 2 * (1 - beta) * beta * (1 - a)


def _weighted_ef(s: dict[str, Any], seed: int, gamma_emp: float, out: Path, progress: ProgressFn) -> dict[str, Any]:
    """Weighted EF (4.14) on a fixed i.i.d. N(0, I) stream g_t; ||r_t||^2 / B with B = E||g||^2 = d."""
    import torch

    from .compression.base import make_codec
    from .compression.error_feedback import WeightedErrorFeedback, optimal_beta, residual_bound
    from .rng import derive_seed, torch_generator

    n, k, Q = int(s["block"]), int(s["ef_k"]), s["ef_levels"]
    d, T = n * int(s["ef_blocks"]), int(s["ef_steps"])
    cap = float(s.get("ef_cap", 1e6))
    stream = [torch.randn(d, generator=torch_generator(seed, "reproduce", "ef-stream", t)) for t in range(T)]
    codecs = {a: make_codec("qcs", dim=d, block=n, k=k, levels=Q, alpha=a) for a in ("unbiased", "mmse")}
    gam = codecs["unbiased"].gamma
    cases = []
    for a, betas in (("unbiased", s["ef_betas"]), ("mmse", s["ef_betas_mmse"])):
        for b in betas:
            cases.append((a, optimal_beta(gam, a) if b == "optimal" else float(b)))
    progress(f"weighted EF: {len(cases)} (alpha, beta) x {T} steps, d = {d}, k = {k}, Q = {Q}, gamma = {gam:.3f}")
    series, summary = [], []
    for a, b in cases:
        ef, codec, r, curve = WeightedErrorFeedback(beta=b), codecs[a], None, []
        for t in range(T):
            z = ef.compensate(stream[t], r)
            sd = derive_seed(seed, "ef-codec", t)  # the same codec randomness for every beta
            r = ef.update(r, z, codec.decode(codec.encode(z, seed=sd), seed=sd))
            ratio = float((r.to(torch.float64) ** 2).sum()) / d
            curve.append(ratio)
            series.append({"alpha": a, "beta": b, "t": t + 1, "residual_over_B": ratio})
            if ratio > cap:
                break
        try:
            bound = residual_bound(gam, b, a)
        except ValueError:
            bound = None  # beta outside Lemma 9's range
        c, slope = _ef_recursion(gamma_emp, gam, b, a)
        pred = [c]  # r_1 = e_0: E||r_1||^2 = c B
        while len(pred) < len(curve):
            pred.append(slope * pred[-1] + c)
        for row, p in zip(series[len(series) - len(curve):], pred):
            row["predicted"] = p
        h = len(curve) // 2
        tail = curve[h:]
        diverged = curve[-1] > cap
        growth = (curve[-1] / curve[h]) ** (1 / max(1, len(curve) - 1 - h)) if diverged else None
        summary.append({"alpha": a, "beta": b, "steps": len(curve), "steady_over_B": None if diverged else sum(tail) / len(tail),
                        "predicted_tail": sum(pred[h:]) / len(pred[h:]), "lemma9_eta": bound,
                        "fixed_point_gamma_emp": c / (1 - slope) if slope < 1 else None,
                        "diverged": diverged, "growth_per_step": growth})
    _write_csv(out / "weighted_ef.csv", series)
    _write_csv(out / "weighted_ef_summary.csv", summary)
    _plot_ef(series, summary, gam, gamma_emp, k, Q, out / "weighted_ef.png")
    return {"ef_gamma": gam, "ef_gamma_emp": gamma_emp, "ef": summary}


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


@register_kind("qcs_codec")
def run_qcs_codec(spec: dict[str, Any], s: dict[str, Any], out: Path, *, progress: ProgressFn) -> dict[str, Any]:
    """Abdi Ch. 4 at the codec level: gain vs MSE, Theorem 7, alpha, weighted EF (see module docstring)."""
    import torch

    from .compression.codecs.qcs import qcs_gamma

    seed = int(spec.get("seed", 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(int(s.get("threads", 1)))  # the machine is shared; the work is many small calls
    try:
        res: dict[str, Any] = {}
        res["gain_mse"] = _gain_vs_mse(s, seed, out, progress)
        res.update(_theorem7_alpha(s, seed, out, progress))
        n = int(s["block"])
        # gamma measured at the EF point, on its own blocks
        _, e, _ = codec_block_errors("qcs", {"k": int(s["ef_k"]), "levels": s["ef_levels"]},
                                     _gaussian_blocks(seed, "ef-gamma", int(s["blocks"]), n), seed)
        res.update(_weighted_ef(s, seed, float(e.mean()), out, progress))
    finally:
        torch.set_num_threads(threads)
    for key, kw in (("thesis_gain_optimum", {}), ("wire_gain_optimum", {"levels": [0.5, *range(1, 65)], "wire": True})):
        res[key] = {}
        for g in (32, 100):
            try:
                res[key][str(g)] = best_qcs_parameters(n, g, **kw)
            except ValueError:
                res[key][str(g)] = None  # gain out of reach at this block length
    res["notes_points"] = _notes_points(res["theorem7"], n, qcs_gamma)
    res["files"] = sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".png"))
    return res


def _notes_points(rows, n, qcs_gamma) -> list[dict[str, Any]]:
    """NOTES §6's Monte-Carlo figures (n = 256, k = 32) beside ours, when the grid has them."""
    notes = {(32, 1): (14.155, 10.81), (32, 2): (8.789, 7.95), (32, 4): (7.447, 7.23), (32, 0.5): (35.62, 22.25)}
    out = []
    for (k, Q), (gam, mc) in notes.items():
        for r in rows:
            if r["k"] == k and r["levels"] == Q:
                out.append({"k": k, "levels": Q, "notes_gamma": gam, "gamma": qcs_gamma(n, k, Q),
                            "notes_mc": mc, "ours": r["unbiased_mse"], "ours_se": r["unbiased_se"]})
                if Q == 1:
                    out.append({"k": k, "levels": Q, "alpha": "mmse", "notes_gamma": 0.9340,
                                "gamma": r["mmse_bound"], "notes_mc": 0.9195, "ours": r["mmse_mse"],
                                "ours_se": r["mmse_se"]})
    return out


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
    from .config import ConfigError, packaged_config

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

    Overrides, in order: ``simulation.backend=vectorized`` (fl_sim.vectorized: the inline backend's numbers,
    a round's clients trained in batches), :data:`HONEST_CLIENTS` (the relative reply guards off), the
    settings' ``set``, the entry's ``set``,
    ``name=NAME``. A run whose summary.json exists with the same config.yaml (up to
    fl_sim.checkpoint.ENGINE_KEYS: a run made with another backend counts) is not rerun. All configs
    are validated before the first run starts.
    """
    from .checkpoint import config_differences  # engine keys (backend, ...) aside: the same numbers
    from .config import config_to_dict, load_config
    from .results import report

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

        from .simulation import run_experiment

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


def plot_metric_vs_round(
    run_dirs: list[Path], column: str, path: Path, *, reference: float | None = None,
    reference_label: str = "reference", logy: bool = False,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """A per-round metric (e.g. ``update_sparsity``) against the round for some runs, with an optional
    horizontal reference line (e.g. Tang's K/d); returns the PNG and per run {first, median, last,
    min, max} of the metric (rounds where it is finite)."""
    import numpy as np

    from .results import load_run

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
