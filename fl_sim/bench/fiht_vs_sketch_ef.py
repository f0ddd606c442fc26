"""Why does Count Sketch + EF cope with dense updates where FIHT-CS + EF does not?

A codec-level experiment without training: one fixed stream of T update vectors g_t (d = 14,210, the dense
task's MLP) goes through each server pipeline of fl-sim (the same codecs and operators as the strategies),
and we measure how much of the cumulative update reaches the model:

    err_T = ||sum_t g_t - sum_t Delta_t|| / ||sum_t g_t||     (1 = nothing delivered, 0 = all of it)

The stream: g_t = s * (mu + z_t) with a fixed direction mu and fresh noise z_t (i.i.d. N(0, 1), equal
energy), and a fixed per-coordinate scale s. ``dense``: s lognormal with sigma^2 = ln(2 / (pi sp)) so that
sp(g) = ||g||_1^2 / (d ||g||_2^2) ~= sp = 0.3 (the dense task measures 0.25-0.42); ``sparse``: s = 1 on
K0 = 0.02 d fixed coordinates, 0 elsewhere (sp ~= 0.02 < K/d, Tang's premise).

The 2 x 3 design isolates the decoder from the residual rule and from K:
    decoder:       FIHT on Phi = sqrt(d/Q) x Q rows of the DCT (fiht_cs codec) | Count Sketch 1 x Q, top-K unsketch
    residual rule: subtract (r <- y - A Delta, FIHT-CS's rule) | zero (FetchSGD's: zero the cells the applied
                   coordinates hash to; sketch only) | none (r <- 0, no error feedback)
    K:             Tang's K/d (638) | Q (1,421, what configs/cs_ef.yaml unsketches)
Q = d/10 throughout (equal uplink bits). Run: ``fl-sim bench fiht-vs-sketch [--steps 60] [--out FILE]`` (or
``python -m fl_sim.bench.fiht_vs_sketch_ef``); figures in docs/comparison/README.md. ``--smoke``: tiny sizes
(d = 1,421, 2 steps) for the test suite; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from fl_sim.bench.bench_codecs import write_json
from fl_sim.compression import codecs as _register  # noqa: F401 (registers the codecs)
from fl_sim.compression.base import make_codec
from fl_sim.compression.sketch import CountSketch
from fl_sim.rng import torch_generator

D = 14_210
SMOKE_D = 1_421


def sizes(d: int) -> tuple[int, int]:
    """(Q, K_Tang) at dimension d: Q = d/10 measurements or cells, K = Tang's 30,000 / 668,426 of d."""
    return d // 10, round(30_000 / 668_426 * d)


Q, K_TANG = sizes(D)


def stream(kind: str, steps: int, seed: int = 0, d: int = D) -> list[torch.Tensor]:
    g = torch_generator(seed, "fiht-vs-sketch", kind)
    if kind == "dense":
        sp = 0.3
        sigma = math.sqrt(math.log(2 / (math.pi * sp)))
        s = torch.exp(sigma * torch.randn(d, generator=g))
    else:
        s = torch.zeros(d)
        s[torch.randperm(d, generator=g)[: int(0.02 * d)]] = 1.0
    mu = torch.randn(d, generator=g)
    return [s * (mu + torch.randn(d, generator=g)) for _ in range(steps)]


def sparsity(x: torch.Tensor) -> float:
    return float(x.abs().sum() ** 2 / (x.numel() * (x * x).sum()))


def run(decoder: str, rule: str, k: int, gs: list[torch.Tensor]) -> dict:
    d = gs[0].numel()
    q = sizes(d)[0]
    total_g, total_d = torch.zeros(d), torch.zeros(d)
    resid_norms, t0 = [], time.perf_counter()
    if decoder == "fiht":
        codec = make_codec("cs_fiht", dim=d, measurements=q, sparsity=k, transform="dct", max_iter=25)
        r = torch.zeros(q)
        for g in gs:
            y = codec.measure(g, seed=1) + r
            delta = codec.recover(y, seed=1)
            r = y - codec.measure(delta, seed=1) if rule == "subtract" else torch.zeros(q)
            total_g += g
            total_d += delta
            resid_norms.append(float(r.norm() / y.norm()))
    else:
        cs = CountSketch(d, 1, q, seed=1)
        r = torch.zeros(1, q)
        for g in gs:
            table = cs.sketch(g) + r
            delta, idx = cs.unsketch_topk(table, k)
            if rule == "subtract":
                r = table - cs.sketch(delta)
            elif rule == "zero":
                r = cs.zero_coordinates(table.clone(), idx)
            else:
                r = torch.zeros_like(table)
            total_g += g
            total_d += delta
            resid_norms.append(float(r.norm() / table.norm()))
    return {"decoder": decoder, "rule": rule, "K": k,
            "err_T": float((total_g - total_d).norm() / total_g.norm()),
            "cos_T": float(torch.nn.functional.cosine_similarity(total_g, total_d, dim=0)),
            "residual_share_last": resid_norms[-1], "residual_share_max": max(resid_norms),
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="fiht_vs_sketch_ef", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be at least 1")
    d, steps = (SMOKE_D, 2) if a.smoke else (D, a.steps)
    q, k_tang = sizes(d)
    torch.set_num_threads(1)
    rows = []
    for kind in ("dense", "sparse"):
        gs = stream(kind, steps, d=d)
        sp = float(np.mean([sparsity(g) for g in gs]))
        for decoder, rule, k in [("fiht", "subtract", k_tang), ("fiht", "none", k_tang), ("fiht", "subtract", q),
                                 ("sketch", "zero", k_tang), ("sketch", "subtract", k_tang), ("sketch", "none", k_tang),
                                 ("sketch", "zero", q), ("sketch", "subtract", q)]:
            row = {"stream": kind, "sp": round(sp, 3), **run(decoder, rule, k, gs)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        write_json(rows, Path(a.out))
    return rows


if __name__ == "__main__":
    main()
