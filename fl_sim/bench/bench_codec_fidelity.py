"""Codec fidelity: per-tensor against whole-vector scales, QSGD's Elias bits, TernGrad's clipping (no timing).

Inputs: (a) a real update Δ: one client's local epoch of the shipped ``qsgd`` config's MLP on the
synthetic data from the initial model; (b) Gaussian vectors for QSGD's bit counts (d = 10,000);
(c) Student-t vectors (3 degrees of freedom) for TernGrad's clipping.
Relative MSE = mean over ``--trials`` seeds of ||x_hat - x||^2 / ||x||^2; bits = the payload's exact
length. Every random draw comes from a seeded generator (:mod:`fl_sim.rng`), so two runs print the
same table.

Usage: ``fl-sim bench fidelity [--trials 200] [--out bench_out/fidelity.json] [--smoke]`` (or
``python -m fl_sim.bench.bench_codec_fidelity``); figures in docs/codecs.md. ``--smoke``: tiny sizes
(a 2-client config, d = 256, 2 trials) for the test suite; its figures mean nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fl_sim.bench.bench_codecs import write_json
from fl_sim.clients.training import LocalTrainSpec, train_local
from fl_sim.compression import make_codec
from fl_sim.config import load_config, packaged_config
from fl_sim.runs.build import build_experiment
from fl_sim.rng import torch_generator
from fl_sim.wire.records import flatten_arrays, float_sizes, state_dict_to_arrays

__all__ = ["real_update", "rel_mse", "student_t", "run", "main"]

CONFIG = "qsgd"
SMOKE_SET = ["clients=2", "clients_per_round=2", "model.hidden=[8]"]


def real_update(cid: int = 0, overrides: list[str] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Δ = w' − w0 of client ``cid`` after its local epoch(s) of the shipped ``qsgd`` config, and the
    float tensors' sizes (the segments of a per-tensor codec)."""
    cfg = load_config(packaged_config(CONFIG), overrides or [])
    exp = build_experiment(cfg)
    w0 = flatten_arrays(exp.initial_arrays)
    x, y = exp.data.client_data(int(exp.data.eligible_clients[cid]))
    spec = LocalTrainSpec(lr=cfg.train.lr, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
    train_local(exp.model, x, y, spec, torch_generator(0, "bench", cid))
    arrays = state_dict_to_arrays(exp.model.state_dict())
    return flatten_arrays(arrays) - w0, float_sizes(arrays)


def rel_mse(name: str, x: torch.Tensor, trials: int, **params) -> tuple[float, float]:
    """(mean relative MSE, mean bits) of codec ``name`` on ``x`` over encode seeds 0..trials-1."""
    codec = make_codec(name, dim=x.numel(), **params)
    errs, bits = [], []
    for s in range(trials):
        p = codec.encode(x, seed=s)
        errs.append(float(((codec.decode(p, seed=s) - x) ** 2).sum() / (x**2).sum()))
        bits.append(p.bits)
    return float(np.mean(errs)), float(np.mean(bits))


def student_t(d: int, dof: int, generator: torch.Generator) -> torch.Tensor:
    """d draws of Student's t with an integer number of degrees of freedom ν from a seeded generator:
    t = z / sqrt(χ²_ν / ν) with z ~ N(0, 1) and χ²_ν the sum of ν squared standard normals
    (torch.distributions.StudentT samples from the global generator only)."""
    z = torch.randn(d, generator=generator)
    chi2 = torch.randn(dof, d, generator=generator).square().sum(0)
    return z / (chi2 / dof).sqrt()


def _rows(k: int, sizes: list[int]) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, codec, parameters) of the real-update table; ``sizes``: the model's float tensors."""
    return [
        ("qsgd s=4 vector, fixed (old default)", "qsgd", dict(levels=4, granularity="vector", coding="fixed")),
        ("qsgd s=4 tensor, fixed", "qsgd", dict(levels=4, segments=sizes, coding="fixed")),
        ("qsgd s=4 tensor, elias (new default)", "qsgd", dict(levels=4, segments=sizes)),
        ("qsgd s=4 vector, elias", "qsgd", dict(levels=4, granularity="vector")),
        ("terngrad vector, no clip (old default)", "terngrad", dict(granularity="vector", clip_sigma=None)),
        ("terngrad tensor, no clip", "terngrad", dict(segments=sizes, clip_sigma=None)),
        ("terngrad tensor, clip 2.5 (new default)", "terngrad", dict(segments=sizes)),
        ("sign vector (old default)", "sign", dict(granularity="vector")),
        ("sign tensor (new default)", "sign", dict(segments=sizes)),
        (f"topk k={k} vector (default)", "topk", dict(k=k)),
        (f"topk k={k} tensor", "topk", dict(k=k, segments=sizes, granularity="tensor")),
        (f"topk k={k} vector, elias indices", "topk", dict(k=k, index_coding="elias")),
    ]


def run(trials: int = 200, *, smoke: bool = False) -> dict[str, Any]:
    """The three tables: {"real_update", "qsgd_bits", "terngrad_student_t"}, each {sizes..., "rows": [...]}."""
    d_gauss, vectors = (256, 2) if smoke else (10_000, 20)
    delta, sizes = real_update(overrides=SMOKE_SET if smoke else None)
    k = max(1, delta.numel() // 100)  # 1 % of the coordinates (142 at d = 14,210)
    rows = []
    for label, name, params in _rows(k, sizes):
        m, b = rel_mse(name, delta, trials, **params)
        rows.append({"codec": label, "rel_mse": m, "bits": b})
    bits = []
    for s in (1, 4, 16):
        got: dict[str, list[int]] = {"elias": [], "fixed": []}
        for t in range(vectors):
            x = torch.randn(d_gauss, generator=torch_generator(t, "gauss"))
            for c in got:
                got[c].append(make_codec("qsgd", dim=d_gauss, levels=s, coding=c).encode(x, seed=t).bits)
        bits.append({"levels": s, "elias": float(np.mean(got["elias"])), "fixed": float(np.mean(got["fixed"]))})
    x = student_t(d_gauss, 3, torch_generator(0, "student-t"))
    tern = [{"clip_sigma": clip, "rel_mse": rel_mse("terngrad", x, trials, clip_sigma=clip)[0]} for clip in (None, 2.5)]
    return {"smoke": smoke, "trials": trials,
            "real_update": {"d": delta.numel(), "tensors": sizes, "rows": rows},
            "qsgd_bits": {"d": d_gauss, "vectors": vectors, "rows": bits},
            "terngrad_student_t": {"d": d_gauss, "dof": 3, "rows": tern}}


def report(data: dict[str, Any], log=print) -> None:
    ru, qb, ts = data["real_update"], data["qsgd_bits"], data["terngrad_student_t"]
    log(f"real update: d = {ru['d']}, tensors = {ru['tensors']}; mean of {data['trials']} seeds")
    log(f"{'codec':<44}{'rel MSE':>10}{'bits':>12}")
    for r in ru["rows"]:
        log(f"{r['codec']:<44}{r['rel_mse']:>10.3f}{r['bits']:>12.0f}")
    log(f"\nQSGD bits at d = {qb['d']:,} (Gaussian, whole vector; mean of {qb['vectors']} vectors)")
    for r in qb["rows"]:
        log(f"  s={r['levels']:<3} elias {r['elias']:8.0f}   fixed {r['fixed']:8.0f}")
    log(f"\nTernGrad on Student-t ({ts['dof']} dof), d = {ts['d']:,}, one tensor")
    for r in ts["rows"]:
        log(f"  clip_sigma={r['clip_sigma']}: rel MSE {r['rel_mse']:.3f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench_codec_fidelity", description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200, help="encode seeds per relative MSE")
    p.add_argument("--out", type=Path, default=Path("bench_out/fidelity.json"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    a = p.parse_args(argv)
    if a.trials < 1:
        p.error("--trials must be at least 1")
    data = run(2 if a.smoke else a.trials, smoke=a.smoke)
    report(data)
    write_json(data, a.out)
    print(f"wrote {a.out}")
    return data


if __name__ == "__main__":
    main()
