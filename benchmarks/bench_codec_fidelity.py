"""Codec fidelity figures of the paper-fidelity changes: per-tensor vs whole-vector scales, QSGD's Elias bits,
TernGrad's clipping. Prints a table; no timing.

Inputs: (a) a real update Δ: one client's local epoch of configs/qsgd.yaml's MLP on the synthetic data
from the initial model; (b) Gaussian vectors for QSGD's bit counts (d = 10,000, as the issue);
(c) Student-t (3 degrees of freedom) for TernGrad's clipping.
Relative MSE = mean over ``--trials`` seeds of ||x_hat - x||^2 / ||x||^2.

    PYTHONPATH=$PWD python benchmarks/bench_codec_fidelity.py [--trials 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fl_sim.runs.build import build_experiment
from fl_sim.clients.training import LocalTrainSpec, train_local
from fl_sim.compression import make_codec
from fl_sim.config import load_config
from fl_sim.wire.records import flatten_arrays, float_sizes, state_dict_to_arrays
from fl_sim.rng import torch_generator

ROOT = Path(__file__).resolve().parents[1]


def real_update(cid: int = 0) -> tuple[torch.Tensor, list[int]]:
    cfg = load_config(ROOT / "configs" / "qsgd.yaml")
    exp = build_experiment(cfg)
    w0 = flatten_arrays(exp.initial_arrays)
    x, y = exp.data.client_data(int(exp.data.eligible_clients[cid]))
    spec = LocalTrainSpec(lr=cfg.train.lr, batch_size=cfg.train.batch_size, local_epochs=cfg.train.local_epochs)
    train_local(exp.model, x, y, spec, torch_generator(0, "bench", cid))
    arrays = state_dict_to_arrays(exp.model.state_dict())
    return flatten_arrays(arrays) - w0, float_sizes(arrays)


def rel_mse(name: str, x: torch.Tensor, trials: int, **params) -> tuple[float, float]:
    codec = make_codec(name, dim=x.numel(), **params)
    errs, bits = [], []
    for s in range(trials):
        p = codec.encode(x, seed=s)
        errs.append(float(((codec.decode(p, seed=s) - x) ** 2).sum() / (x**2).sum()))
        bits.append(p.bits)
    return float(np.mean(errs)), float(np.mean(bits))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    a = ap.parse_args()
    delta, sizes = real_update()
    print(f"real update: d = {delta.numel()}, tensors = {sizes}")
    print(f"{'codec':<44}{'rel MSE':>10}{'bits':>12}")
    rows = [
        ("qsgd s=4 vector, fixed (old default)", "qsgd", dict(levels=4, granularity="vector", coding="fixed")),
        ("qsgd s=4 tensor, fixed", "qsgd", dict(levels=4, segments=sizes, coding="fixed")),
        ("qsgd s=4 tensor, elias (new default)", "qsgd", dict(levels=4, segments=sizes)),
        ("qsgd s=4 vector, elias", "qsgd", dict(levels=4, granularity="vector")),
        ("terngrad vector, no clip (old default)", "terngrad", dict(granularity="vector", clip_sigma=None)),
        ("terngrad tensor, no clip", "terngrad", dict(segments=sizes, clip_sigma=None)),
        ("terngrad tensor, clip 2.5 (new default)", "terngrad", dict(segments=sizes)),
        ("sign vector (old default)", "sign", dict(granularity="vector")),
        ("sign tensor (new default)", "sign", dict(segments=sizes)),
        ("topk k=142 vector (default)", "topk", dict(k=142)),
        ("topk k=142 tensor", "topk", dict(k=142, segments=sizes, granularity="tensor")),
        ("topk k=142 vector, elias indices", "topk", dict(k=142, index_coding="elias")),
    ]
    for label, name, params in rows:
        m, b = rel_mse(name, delta, a.trials, **params)
        print(f"{label:<44}{m:>10.3f}{b:>12.0f}")

    print("\nQSGD bits at d = 10,000 (Gaussian, whole vector; mean of 20 vectors)")
    for s in (1, 4, 16):
        bits = {c: [] for c in ("elias", "fixed")}
        for t in range(20):
            x = torch.randn(10_000, generator=torch_generator(t, "gauss"))
            for c in bits:
                bits[c].append(make_codec("qsgd", dim=10_000, levels=s, coding=c).encode(x, seed=t).bits)
        print(f"  s={s:<3} elias {np.mean(bits['elias']):8.0f}   fixed {np.mean(bits['fixed']):8.0f}")

    print("\nTernGrad on Student-t (3 dof), d = 10,000, one tensor")
    x = torch.distributions.StudentT(3.0).sample((10_000,))
    for clip in (None, 2.5):
        m, _ = rel_mse("terngrad", x, a.trials, clip_sigma=clip)
        print(f"  clip_sigma={clip}: rel MSE {m:.3f}")


if __name__ == "__main__":
    main()
