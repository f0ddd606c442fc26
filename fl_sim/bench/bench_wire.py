"""What one client's reply carries on the wire against what the codec counts, per codec.

For each codec at d = 100,000 in two tensors (60,000 + 40,000, per-tensor scales where the codec takes
them), one update x ~ N(0, 1) is encoded and turned into the reply records exactly as
``compression_mod`` does (:func:`fl_sim.wire.records.payload_to_records`), then read back as the server does
(:func:`fl_sim.wire.records.read_payload`). Columns:

* counted_bits: ``Payload.bits``, the codec's exact count (the method table's figure);
* wire_bits: 8 x the data bytes of the reply's arrays (the server's uplink count; byte padding only);
* unpacked_bits: 8 x the bytes of the payload's tensors as they are in memory, i.e. what a reply carried
  before packing (int8 levels, int64 indices, uint8 bits); ``before = unpacked_bits / counted_bits``,
  ``after = wire_bits / counted_bits``;
* message_bytes: the bytes of the Flower objects a deployment transfers for the reply
  (``Message`` -> RecordDict -> records -> Arrays -> chunks, each deflated with its header:
  ``flwr.supercore.inflatable.get_all_nested_objects``), measured on a reply built like the mod's
  (arrays, payload ConfigRecord, metrics); framing_bytes = message_bytes - wire_bits / 8;
* pack_ms, unpack_ms: best of ``repeats`` of ``codec.wire_arrays`` and ``codec.from_wire``.

Usage: ``python -m fl_sim.bench.bench_wire [--d 100000] [--repeats 20] [--out bench_out/wire.json] [--markdown]
[--smoke]``; ``fl-sim bench wire``. Library: ``run(d, repeats) -> dict``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fl_sim.wire import keys
from fl_sim.compression import make_codec
from fl_sim.compression.packing import wire_bits
from fl_sim.wire.records import payload_to_records, read_payload
from fl_sim.rng import torch_generator
from fl_sim.runs.results import atomic_write

# codec label -> (registry name, parameters as a function of d): the methods of the README's table
METHODS: dict[str, tuple[str, Callable[[int], dict[str, Any]]]] = {
    "qcs": ("qcs", lambda d: {"block": 256, "k": 110, "levels": 2}),
    "qcs_1bit": ("qcs", lambda d: {"block": 256, "k": 110, "levels": 0.5}),
    "onebit_cs": ("onebit_cs", lambda d: {"measurements": d // 2}),
    "topk (auto)": ("topk", lambda d: {"k": d // 100}),
    "topk (fixed)": ("topk", lambda d: {"k": d // 100, "index_coding": "fixed"}),
    "qsgd": ("qsgd", lambda d: {"levels": 4}),
    "qsgd (fixed)": ("qsgd", lambda d: {"levels": 4, "coding": "fixed"}),
    "terngrad": ("terngrad", lambda d: {}),
    "sign": ("sign", lambda d: {}),
    "randk": ("randk", lambda d: {"k": d // 100}),
    "fp16": ("fp16", lambda d: {}),
    "cs_fiht": ("cs_fiht", lambda d: {"measurements": d // 4, "sparsity": d // 100}),
    "count_sketch (FetchSGD)": ("count_sketch", lambda d: {"rows": 5, "cols": d // 50, "k": d // 100}),
    "rlc": ("rlc", lambda d: {"m": d // 20}),
    "identity": ("identity", lambda d: {}),
}


def _codec(name: str, params: dict[str, Any], d: int, segments: list[int]):
    codec = make_codec(name, dim=d, **params)
    if "segments" in codec.params():  # per-tensor scales, as CompressedFedAvg configures them
        codec = make_codec(name, dim=d, **params, segments=segments)
    return codec


def message_bytes(arrays, meta) -> int:
    """Bytes of the Flower objects of a reply carrying these records (module docstring)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fl_sim.engine.inline import InMemoryGrid

    grid = InMemoryGrid(lambda m, c: m, 1)  # sets the server's task identity that Message() reads
    parent = grid.create_message(RecordDict(), "train", grid.node_ids[0], "")
    content = RecordDict({keys.ARRAYS: arrays, keys.PAYLOAD_META: meta,
                          keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 100, keys.UPLINK_BITS: 123456})})
    msg = Message(content=content, reply_to=parent)
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def _best(fn, repeats: int) -> tuple[float, Any]:
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(label: str, d: int, segments: list[int], repeats: int) -> dict[str, Any]:
    name, params = METHODS[label]
    codec = _codec(name, params(d), d, segments)
    x = torch.randn(d, generator=torch_generator(0, "bench_wire", d))
    p = codec.encode(x, seed=1)
    unpacked = 8 * sum(int(t.numpy().nbytes) for t in p.tensors.values())
    t_pack, wire = _best(lambda: codec.wire_arrays(p), repeats)
    t_unpack, back = _best(lambda: codec.from_wire(wire), repeats)
    arrays, meta = payload_to_records(p, codec)
    received, counted_by_server = read_payload(arrays, meta, codec)
    same = all(torch.equal(received.tensors[k], t) for k, t in p.tensors.items())
    wb = wire_bits(wire.values())
    msg = message_bytes(arrays, meta)
    return {"codec": label, "d": d, "tensors": len(wire), "counted_bits": int(p.bits), "wire_bits": wb,
            "server_bits": int(counted_by_server), "unpacked_bits": unpacked, "before": unpacked / p.bits,
            "after": wb / p.bits, "message_bytes": msg, "framing_bytes": msg - wb // 8,
            "pack_ms": 1e3 * t_pack, "unpack_ms": 1e3 * t_unpack, "round_trip_exact": bool(same)}


def run(d: int = 100_000, repeats: int = 20) -> dict[str, Any]:
    segments = [d - d * 2 // 5, d * 2 // 5]
    rows = [measure(label, d, segments, repeats) for label in METHODS]
    return {"d": d, "segments": segments, "torch": torch.__version__, "numpy": np.__version__, "rows": rows}


COLUMNS = ["codec", "d", "counted_bits", "wire_bits", "before", "after", "message_bytes", "framing_bytes",
           "pack_ms", "unpack_ms"]


def _fmt(v: Any, col: str = "") -> str:
    if col in ("before", "after"):
        return f"{v:.4g}"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_fmt(r[c], c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=100_000, help="update length (two tensors, 60%% + 40%%)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench_out/wire.json"))
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--smoke", action="store_true", help="d = 2000, one repeat (the test suite; figures meaningless)")
    args = parser.parse_args(argv)
    d, repeats = (2_000, 1) if args.smoke else (args.d, args.repeats)
    if d < 1000 or repeats < 1:
        raise ValueError(f"bench wire: --d {d} --repeats {repeats}: use d >= 1000 (top-k's k = d/100 >= 10) and "
                         "repeats >= 1")
    data = run(d, repeats)
    data["smoke"] = bool(args.smoke)
    if args.markdown:
        print(markdown(data["rows"]))
    else:
        widths = {c: max(len(c), *(len(_fmt(r[c], c)) for r in data["rows"])) for c in COLUMNS}
        print("  ".join(c.rjust(widths[c]) for c in COLUMNS))
        for r in data["rows"]:
            print("  ".join(_fmt(r[c], c).rjust(widths[c]) for c in COLUMNS))
    atomic_write(args.out, json.dumps(data, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
