"""The ``qcs_codec`` kind: Abdi's QCS at the codec level by Monte Carlo (gain vs MSE, Theorem 7, alpha, weighted EF).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fl_sim.experiments.reproduce.qcs_theory import best_qcs_parameters
from fl_sim.experiments.reproduce.report import (
    _plot_ef,
    _plot_gain_mse,
    _plot_theorem7,
    _write_csv,
)
from fl_sim.experiments.reproduce.spec import FLOAT_BITS, ProgressFn, register_kind

# ---------------------------------------------------------------------------------------------------
# Codec-level measurements ([Abdi-thesis] Ch. 4)
# ---------------------------------------------------------------------------------------------------
BLOCKWISE_CODECS = ("qcs",)  # codecs that cut a long vector into n-blocks themselves (one call for all blocks)

def codec_block_errors(name: str, params: dict[str, Any], G, seed: int):
    """Encode/decode every row g_b of G (B x n) with the real codec; returns (G_hat, rel_err, bits per block).

    rel_err_b = ||g_b - g_hat_b||^2 / ||g_b||^2 (float64, shape (B,)). Blockwise codecs (QCS) take the B
    rows as one vector of B*n coordinates with ``block=n`` (independent signs, rows and dither per block);
    the others run once per row at dim n with seed derive_seed(seed, name, b).
    """
    import torch

    from fl_sim.compression.base import make_codec
    from fl_sim.rng import derive_seed

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
    """B x n i.i.d. N(0, 1) rows (the test vectors; the reference Monte-Carlo of docs/notes.md#qcs-numbers uses Gaussian vectors too)."""
    import torch

    from fl_sim.rng import torch_generator

    return torch.randn(blocks, n, generator=torch_generator(seed, "reproduce", purpose), dtype=torch.float32)

def _mean_se(err) -> tuple[float, float]:
    m = float(err.mean())
    se = float(err.std(unbiased=True)) / math.sqrt(err.numel()) if err.numel() > 1 else 0.0
    return m, se


def _gain_vs_mse(s: dict[str, Any], seed: int, out: Path, progress: ProgressFn) -> dict[str, Any]:
    """Fig. 4.1 analogue: every codec on the same B blocks of n Gaussian coordinates."""
    from fl_sim.compression.codecs.qcs import qcs_gamma
    from fl_sim.compression.quantizers import qsgd_variance_bound

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

def _theorem7_alpha(s: dict[str, Any], seed: int, out: Path, progress: ProgressFn) -> dict[str, Any]:
    """Unbiased-QCS MSE vs gamma (Theorem 7), MMSE-QCS vs Lemma 8, and an unbiasedness check."""
    import torch

    from fl_sim.compression.codecs.qcs import qcs_gamma
    from fl_sim.rng import derive_seed

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

    from fl_sim.compression.base import make_codec
    from fl_sim.compression.error_feedback import (
        WeightedErrorFeedback,
        optimal_beta,
        residual_bound,
    )
    from fl_sim.rng import derive_seed, torch_generator

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

@register_kind("qcs_codec")
def run_qcs_codec(spec: dict[str, Any], s: dict[str, Any], out: Path, *, progress: ProgressFn) -> dict[str, Any]:
    """[Abdi-thesis] Ch. 4 at the codec level: gain vs MSE, Theorem 7, alpha, weighted EF (see module docstring)."""
    import torch

    from fl_sim.compression.codecs.qcs import qcs_gamma

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
    """The reference Monte-Carlo figures of docs/notes.md#qcs-numbers (n = 256, k = 32) beside ours, when the grid
    has them."""
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
