"""Encode / decode time of every registered codec against torch.fft.rfft of the same length.

For each codec (``codec_names()``, default parameters from :func:`default_params`) and each
d in 2^16 .. 2^23 (quick: 2^16, 2^20) and d = 668,426 (Tang et al.'s ResNet):

* encode_ms: best of ``repeats`` encodes of a Gaussian vector, each with a fresh seed, so a codec's
  per-seed operator (signs, rows, hashes) is rebuilt as in a real round;
* decode_ms: best of ``repeats`` decodes of that payload with its seed (the server's operator cache hit);
* rfft_ms: torch.fft.rfft of a length-d float32 vector, measured in the same run;
  encode_ratio, decode_ratio = time / rfft_ms;
* bits, bits/coordinate and relative error ||x - x_hat|| / ||x||.

A codec whose encode + decode at one size exceeds the time budget is skipped at larger sizes.
The sibling benchmarks ``bench_transforms.run`` and ``bench_recovery.run`` are included when present.

Usage: ``python -m benchmarks.bench_codecs [--quick] [--out bench_out/codecs.json] [--no-others]``.
Library: ``run(quick=False) -> dict``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fl_sim.compression import codec_names, make_codec
from fl_sim.rng import torch_generator

TANG_D = 668_426
FULL_SIZES = [2**e for e in range(16, 24)] + [TANG_D]
QUICK_SIZES = [2**16, 2**20, TANG_D]


def default_params(name: str, d: int) -> dict[str, Any]:
    """Benchmark parameters per codec: 1% sparsity, gain ~ 10-20 for projections, thesis QCS defaults."""
    table: dict[str, dict[str, Any]] = {
        "topk": {"k": max(1, d // 100)},
        "randk": {"k": max(1, d // 100)},
        "qsgd": {"levels": 4},
        "qcs": {"block": 256, "k": 110, "levels": 2},  # NOTES §6: gain ~ 32 optimum at n = 256
        "rlc": {"m": max(1, d // 20)},  # thesis Fig. 5.3: gain 20
        "dataq": {"levels": 8, "mode": "per_feature"},
        "cs_fiht": {"measurements": max(1, d // 10), "sparsity": max(1, d // 100)},
        "onebit_cs": {"measurements": max(1, d // 10)},
        "count_sketch": {"rows": 5, "cols": max(1, d // 50), "k": max(1, d // 100)},
    }
    return dict(table.get(name, {}))


def best_of(fn: Callable[[int], Any], repeats: int) -> tuple[float, Any]:
    """Best wall time (s) of fn(i) for i = 1..repeats, after one untimed warm-up fn(0); returns (time, last output)."""
    out = fn(0)
    best = math.inf
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        out = fn(i)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rfft_ms(x: torch.Tensor, repeats: int) -> float:
    return 1e3 * best_of(lambda _i: torch.fft.rfft(x), max(10, 2 * repeats))[0]


def bench_codec(name: str, x: torch.Tensor, rfft_ms: float, repeats: int) -> dict[str, Any]:
    """One row: times, ratios to rfft, bits and relative error of codec ``name`` at d = x.numel()."""
    d = x.numel()
    params = default_params(name, d)
    codec = make_codec(name, dim=d, **params)
    t_enc, payload = best_of(lambda i: codec.encode(x, seed=1000 + i), repeats)
    seed = 1000 + repeats
    t_dec, x_hat = best_of(lambda _i: codec.decode(payload, seed=seed), repeats)
    rel = float((x_hat - x).norm() / x.norm())
    return {
        "bench": "codec",
        "codec": name,
        "d": d,
        "params": params,
        "encode_ms": 1e3 * t_enc,
        "decode_ms": 1e3 * t_dec,
        "rfft_ms": rfft_ms,
        "encode_ratio": 1e3 * t_enc / rfft_ms,
        "decode_ratio": 1e3 * t_dec / rfft_ms,
        "bits": int(payload.bits),
        "bits_per_coord": payload.bits / d,
        "rel_error": rel,
    }


def run_codecs(sizes: list[int], repeats: int, budget_s: float, names: list[str] | None = None) -> list[dict]:
    """Rows for every codec x size; a codec over ``budget_s`` for one encode+decode skips larger sizes."""
    names = names or codec_names()
    over: dict[str, str] = {}
    rows: list[dict] = []
    for d in sizes:
        x = torch.randn(d, generator=torch_generator(0, "bench_codecs", d))
        rfft_ms = _rfft_ms(x, repeats)
        for name in names:
            if name in over:
                rows.append({"bench": "codec", "codec": name, "d": d, "skipped": over[name]})
                continue
            try:
                row = bench_codec(name, x, rfft_ms, repeats)
            except Exception as exc:  # a benchmark reports failures, it does not stop
                rows.append({"bench": "codec", "codec": name, "d": d, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append(row)
            if (row["encode_ms"] + row["decode_ms"]) / 1e3 > budget_s:
                over[name] = f"over the {budget_s:g} s budget at d = {d}"
    return rows


def _sibling(module: str):
    """benchmarks.<module> (package use) or <module> (script run from benchmarks/); None if absent."""
    for qualified in (f"benchmarks.{module}", module):
        try:
            return importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name not in (qualified, "benchmarks"):
                raise
    return None


def run(quick: bool = False, *, include_others: bool = True) -> dict[str, Any]:
    """All measurements: {"codecs": rows, "transforms": rows, "recovery": rows, ...} (times in ms)."""
    repeats = 2 if quick else 5
    sizes = QUICK_SIZES if quick else FULL_SIZES
    result: dict[str, Any] = {
        "quick": quick,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sizes": sizes,
        "codecs": run_codecs(sizes, repeats, budget_s=5.0 if quick else 30.0),
    }
    if include_others:
        for key, module in (("transforms", "bench_transforms"), ("recovery", "bench_recovery")):
            mod = _sibling(module)
            if mod is None:
                result[key] = {"absent": f"benchmarks/{module}.py not found"}
                continue
            try:
                result[key] = mod.run(quick=quick)
            except Exception as exc:
                result[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def write_json(data: dict, out: Path) -> None:
    """Atomic write: a temporary file in the same folder, then os.replace."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict], title: str) -> None:
    cols = ["codec", "d", "encode_ms", "decode_ms", "rfft_ms", "encode_ratio", "decode_ratio", "bits_per_coord", "rel_error"]
    cells = [[_fmt(r.get(c, r.get("skipped", r.get("error", "")) if c == "encode_ms" else "")) for c in cols] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="left" if c == "codec" else "right")
        for line in cells:
            table.add_row(*line)
        Console(width=160).print(table)
    except ImportError:
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(cols)]
        print(title)
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for line in cells:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 2^16, 2^20, 668426 and fewer repeats")
    parser.add_argument("--out", type=Path, default=Path("bench_out/codecs.json"))
    parser.add_argument("--no-others", action="store_true", help="skip bench_transforms / bench_recovery")
    args = parser.parse_args(argv)
    data = run(quick=args.quick, include_others=not args.no_others)
    print_table(data["codecs"], f"codecs (torch {data['torch']}, {data['torch_threads']} threads; times in ms)")
    write_json(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
