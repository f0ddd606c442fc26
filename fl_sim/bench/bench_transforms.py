"""Benchmark of fl_sim.compression.transforms and .projections (best of several runs, one process).

* fwht vs torch.fft.rfft of the same (power-of-2) length n, d = 2^16 .. 2^23 and d = 668,426 (padded to 2^20),
  with torch.get_num_threads() threads and (full run) with one thread each; the requirement is
  ratio = t_fwht / t_rfft <= 0.5 at n = 2^20 and 2^23.
* orthonormal DCT at d = 668,426 (Tang et al.'s ResNet, prime factor 1321) vs at scipy.fft.next_fast_len(d);
  the requirement is ratio < 10.
* forward + adjoint of PartialHadamard (one block, and Abdi's blockwise partitions) and SubsampledOrthogonal
  (DCT, WHT) at d = 668,426, and the time to rebuild each operator from its seed.

Usage: ``fl-sim bench transforms [--quick] [--out bench_out/transforms.json]`` (or ``python -m
fl_sim.bench.bench_transforms``); ``--smoke``: tiny sizes (n = 2^10, d = 1,000) for the test suite, figures
meaningless. Library use: ``run(quick=False, smoke=False) -> list[dict]`` (one dict per measurement).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import scipy.fft
import torch

from fl_sim.compression.projections import PartialHadamard, SubsampledOrthogonal
from fl_sim.compression.transforms import dct, fwht, idct, next_pow2
from fl_sim.rng import torch_generator

TANG_D = 668426
SMOKE_D = 1000


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time in seconds over ``repeats`` runs, after one untimed warm-up (JIT, plans, page faults)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _randn(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch_generator(0, "bench_transforms", n))


def _one_thread(fn: Callable[[], float]) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _fwht_rows(sizes: list[int], repeats: int, single_thread_too: bool) -> list[dict]:
    rows = []
    for d in sizes:
        n = next_pow2(d)
        x = _randn(n)
        t_fwht = best_of(lambda: fwht(x), repeats)
        t_rfft = best_of(lambda: torch.fft.rfft(x), repeats)
        row = {
            "bench": "fwht_vs_rfft",
            "d": d,
            "n": n,
            "time_ms": 1e3 * t_fwht,
            "ref": "torch.fft.rfft(n)",
            "ref_time_ms": 1e3 * t_rfft,
            "ratio": t_fwht / t_rfft,
        }
        if single_thread_too:  # both sides on one thread: immune to another process taking the second core
            t1_fwht = _one_thread(lambda: best_of(lambda: fwht(x), repeats))
            t1_rfft = _one_thread(lambda: best_of(lambda: torch.fft.rfft(x), repeats))
            row.update(time_1t_ms=1e3 * t1_fwht, ref_time_1t_ms=1e3 * t1_rfft, ratio_1t=t1_fwht / t1_rfft)
        if d != n:  # also the FFT at the unpadded length (slow for d with a large prime factor)
            xd = x[:d].clone()
            row["rfft_at_d_ms"] = 1e3 * best_of(lambda: torch.fft.rfft(xd), repeats)
        rows.append(row)
    return rows


def _dct_rows(repeats: int, d: int = TANG_D) -> list[dict]:
    fast = scipy.fft.next_fast_len(d, real=True)
    x, xf = _randn(d), _randn(fast)
    t_dct, t_idct = best_of(lambda: dct(x), repeats), best_of(lambda: idct(x), repeats)
    t_fast, t_ifast = best_of(lambda: dct(xf), repeats), best_of(lambda: idct(xf), repeats)
    xn = x.numpy()
    t_scipy = best_of(lambda: scipy.fft.dct(xn, norm="ortho", workers=torch.get_num_threads()), max(1, repeats // 2))
    return [
        {"bench": "dct", "d": d, "time_ms": 1e3 * t_dct, "ref": f"dct(next_fast_len={fast})",
         "ref_time_ms": 1e3 * t_fast, "ratio": t_dct / t_fast, "scipy_direct_at_d_ms": 1e3 * t_scipy},
        {"bench": "idct", "d": d, "time_ms": 1e3 * t_idct, "ref": f"idct(next_fast_len={fast})",
         "ref_time_ms": 1e3 * t_ifast, "ratio": t_idct / t_ifast},
    ]


def _operator_rows(repeats: int, d: int = TANG_D) -> list[dict]:
    builders: dict[str, Callable[[int], object]] = {
        "PartialHadamard(k=d/32)": lambda s: PartialHadamard(d, d // 32, seed=s),
        "PartialHadamard(block=256,k=32)": lambda s: PartialHadamard(d, 32, seed=s, block=256),
        "SubsampledOrthogonal(dct,q=d/20)": lambda s: SubsampledOrthogonal(d, d // 20, seed=s),
        "SubsampledOrthogonal(wht,q=d/20)": lambda s: SubsampledOrthogonal(d, d // 20, seed=s, transform="wht"),
    }
    x = _randn(d)
    rows = []
    for name, build in builders.items():
        op = build(1)
        y = op.forward(x)
        rows.append({
            "bench": "operator",
            "name": name,
            "d": d,
            "m": op.m,
            "build_ms": 1e3 * best_of(lambda: build(2), repeats),
            "forward_ms": 1e3 * best_of(lambda: op.forward(x), repeats),
            "adjoint_ms": 1e3 * best_of(lambda: op.adjoint(y), repeats),
        })
        rows[-1]["time_ms"] = rows[-1]["forward_ms"] + rows[-1]["adjoint_ms"]
    return rows


def run(quick: bool = False, *, smoke: bool = False) -> list[dict]:
    """All measurements as dicts (times in milliseconds, best of several runs); ``quick`` = fewer sizes/runs,
    ``smoke`` = tiny sizes, one run (checks that everything runs; the figures mean nothing)."""
    if smoke:
        rows = _fwht_rows([2**10, SMOKE_D], 1, True) + _dct_rows(1, SMOKE_D) + _operator_rows(1, SMOKE_D)
        for r in rows:
            r["threads"] = torch.get_num_threads()
        return rows
    repeats = 3 if quick else 7
    sizes = [2**16, 2**20, TANG_D] if quick else [2**e for e in range(16, 24)] + [TANG_D]
    rows = _fwht_rows(sizes, repeats, not quick) + _dct_rows(repeats) + _operator_rows(repeats)
    threads = torch.get_num_threads()
    for r in rows:
        r["threads"] = threads
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'bench':<14}{'what':<36}{'d':>9}{'time ms':>11}{'ref ms':>11}{'ratio':>8}  ref / extra"]
    for r in rows:
        if r["bench"] == "operator":
            what = r["name"]
            extra = f"fwd {r['forward_ms']:.2f} + adj {r['adjoint_ms']:.2f}, build {r['build_ms']:.2f} ms, m={r['m']}"
            lines.append(f"{'fwd+adjoint':<14}{what:<36}{r['d']:>9}{r['time_ms']:>11.2f}{'':>11}{'':>8}  {extra}")
            continue
        what = f"n={r['n']}" if "n" in r else ""
        extra = r["ref"]
        if "ratio_1t" in r:
            extra += f"; 1 thread: {r['time_1t_ms']:.2f} vs {r['ref_time_1t_ms']:.2f} ms = {r['ratio_1t']:.3f}"
        if "rfft_at_d_ms" in r:
            extra += f"; rfft(d) {r['rfft_at_d_ms']:.2f} ms"
        if "scipy_direct_at_d_ms" in r:
            extra += f"; scipy.fft.dct(d) {r['scipy_direct_at_d_ms']:.2f} ms"
        lines.append(
            f"{r['bench']:<14}{what:<36}{r['d']:>9}{r['time_ms']:>11.2f}{r['ref_time_ms']:>11.2f}"
            f"{r['ratio']:>8.3f}  {extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="bench_transforms", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    parser.add_argument("--out", default="bench_out/transforms.json", help="JSON output path")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick, smoke=args.smoke)
    print(format_table(rows))
    from fl_sim.bench.bench_codecs import write_json

    write_json(rows, Path(args.out))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
