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
The sibling benchmarks ``bench_transforms.run`` and ``bench_recovery.run`` are included when present,
and the library's speed targets are summarised from their rows (:func:`target_rows`): fwht <= 0.5x rfft at
2^20 and 2^23; FIHT at d = 668,426, d/Q = 10 < 0.3 s with rel. error <= 0.12; count sketch r = 5,
c = 500,000, d = 6,570,000: sketch < 0.25 s, top-k unsketch < 0.6 s.

Usage: ``fl-sim bench codecs`` or ``python -m fl_sim.bench.bench_codecs [--quick] [--targets]
[--out bench_out/codecs.json] [--no-others] [--smoke]`` (``--smoke``: d = 2^10, one repeat, the siblings
at their smoke sizes: for the test suite, figures meaningless);
``--targets`` measures only what the targets need (fwht vs rfft at 2^20 and 2^23, count sketch, FIHT),
full size, in one process (a few minutes instead of the whole codec grid).
Library: ``run(quick=False) -> dict``, ``run_targets() -> dict``.
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
SMOKE_SIZES = [2**10]


def default_params(name: str, d: int) -> dict[str, Any]:
    """Benchmark parameters per codec: 1% sparsity, gain ~ 10-20 for projections, thesis QCS defaults."""
    table: dict[str, dict[str, Any]] = {
        "topk": {"k": max(1, d // 100)},
        "randk": {"k": max(1, d // 100)},
        "qsgd": {"levels": 4},
        "qcs": {"block": 256, "k": 110, "levels": 2},  # gain ~ 32 optimum at n = 256 (docs/notes.md#qcs-numbers)
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
    """fl_sim.bench.<module> (bench_transforms, bench_recovery: installed beside this one)."""
    return importlib.import_module(f"fl_sim.bench.{module}")


def run(quick: bool = False, *, include_others: bool = True, smoke: bool = False) -> dict[str, Any]:
    """All measurements: {"codecs": rows, "transforms": rows, "recovery": rows, ...} (times in ms).
    ``smoke``: tiny sizes, one repeat (checks that everything runs; the figures mean nothing)."""
    repeats = 1 if smoke else 2 if quick else 5
    sizes = SMOKE_SIZES if smoke else QUICK_SIZES if quick else FULL_SIZES
    result: dict[str, Any] = {
        "quick": quick,
        "smoke": smoke,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "sizes": sizes,
        "codecs": run_codecs(sizes, repeats, budget_s=5.0 if quick else 30.0),
    }
    if include_others:
        for key, module in (("transforms", "bench_transforms"), ("recovery", "bench_recovery")):
            mod = _sibling(module)
            if mod is None:
                result[key] = {"absent": f"fl_sim.bench.{module} not found"}
                continue
            try:
                result[key] = mod.run(quick=quick, smoke=smoke)
            except Exception as exc:
                result[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def run_targets() -> dict[str, Any]:
    """Only the measurements behind the speed targets, full size, one process."""
    bt, br = _sibling("bench_transforms"), _sibling("bench_recovery")
    load = os.getloadavg()
    transforms = bt._fwht_rows([2**20, 2**23], 7, True) if bt is not None else {"absent": "bench_transforms"}
    recovery = br.run(quick=False) if br is not None else {"absent": "bench_recovery"}
    return {"quick": False, "targets_only": True, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_before": load, "load_after": os.getloadavg(), "transforms": transforms, "recovery": recovery}


def target_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed targets as rows {target, measured, goal, reference, met} from run() / run_targets() output."""
    rows: list[dict[str, Any]] = []
    tr = data.get("transforms") if isinstance(data.get("transforms"), list) else []
    for r in tr:
        if r.get("bench") == "fwht_vs_rfft" and r.get("n") in (2**20, 2**23) and r.get("d") == r.get("n"):
            extra = f", 1 thread {r['ratio_1t']:.2f}x" if "ratio_1t" in r else ""
            rows.append({"target": f"fwht vs torch.fft.rfft, n = 2^{r['n'].bit_length() - 1}",
                         "measured": f"{r['time_ms']:.2f} ms vs {r['ref_time_ms']:.2f} ms = {r['ratio']:.2f}x{extra}",
                         "goal": "<= 0.5x", "reference": "", "met": r["ratio"] <= 0.5})
    rec = data.get("recovery") if isinstance(data.get("recovery"), list) else []
    for r in rec:
        name = r.get("name", "")
        if name.startswith("fiht") and r.get("d") == TANG_D:
            headline = name.endswith("d/Q=10") and not name.startswith("fiht_reference")
            rows.append({"target": f"{name} (K = {r['K']}, {r['iterations']} it.)",
                         "measured": f"{r['time_s']:.3f} s, err {r['rel_error']:.4f}, load {r.get('load_1min')}",
                         "goal": "< 0.3 s, err <= 0.12" if headline else "",
                         "reference": "FIHT.py 0.54 s, 0.118" if headline else "",
                         "met": (r["time_s"] < 0.3 and r["rel_error"] <= 0.12) if headline else None})
        elif name in ("count_sketch.sketch", "count_sketch.unsketch_topk") and "target_s" in r:
            rows.append({"target": f"{name} (d = {r['d']}, r = 5, c = 500k)",
                         "measured": f"{r['time_s']:.3f} s, load {r.get('load_1min')}",
                         "goal": f"< {r['target_s']} s", "reference": f"csvec {r['csvec_ref_s']} s",
                         "met": r["meets_target"]})
    return rows


def print_targets(rows: list[dict[str, Any]]) -> None:
    cols = ["target", "measured", "goal", "reference", "met"]
    cells = [[str(r[c]) if r[c] is not None else "" for c in cols] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) if cells else len(c) for i, c in enumerate(cols)]
    print("speed targets")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


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
    parser = argparse.ArgumentParser(prog="bench_codecs", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 2^16, 2^20, 668426 and fewer repeats")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/codecs.json"))
    parser.add_argument("--no-others", action="store_true", help="skip bench_transforms / bench_recovery")
    parser.add_argument("--targets", action="store_true",
                        help="only the speed targets (fwht vs rfft, count sketch, FIHT), full size")
    args = parser.parse_args(argv)
    if args.targets:
        data = run_targets()
    else:
        data = run(quick=args.quick, include_others=not args.no_others, smoke=args.smoke)
        print_table(data["codecs"], f"codecs (torch {data['torch']}, {data['torch_threads']} threads; times in ms)")
    if isinstance(data.get("recovery"), list):
        _sibling("bench_recovery")._print_table(data["recovery"])
    data["targets"] = target_rows(data)
    print_targets(data["targets"])
    write_json(data, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
