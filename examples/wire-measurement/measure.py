"""Measure each codec's reply size in a real Flower deployment: a SuperLink and two SuperNodes on loopback.

Starts ``flower-superlink`` and two ``flower-supernode`` processes (:class:`fl_sim.engine.loopback.
LoopbackDeployment`: insecure, free ports, runtime dependency installation off, a FLWR_HOME each, every
process stopped by its PID at the end), then ``flwr run`` of ``wireapp`` once per codec; the ServerApp writes
each reply's sizes (wireapp/server_app.py).

Usage (from any directory, with fl-sim and Flower installed): ``python examples/wire-measurement/measure.py
[--out wire_deploy.json] [--codecs topk,qsgd,sign,qcs]``. Prints one row per codec.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fl_sim.engine.loopback import LoopbackDeployment
from fl_sim.runs.results import atomic_write

APP = Path(__file__).resolve().parent
CODECS = {
    "topk": {"k": 1000},
    "qsgd": {"levels": 4},
    "sign": {},
    "qcs": {"block": 256, "k": 110, "levels": 2},
}


def measure(codecs: dict[str, dict], work: Path) -> list[dict]:
    """One ``flwr run`` of wireapp per codec on one loopback deployment; the ServerApp's JSON of each."""
    results = []
    with LoopbackDeployment(work, nodes=2) as deployment:
        for codec, params in codecs.items():
            out = work / f"{codec}.json"
            run = deployment.flwr_run(APP, f"codec='{codec}' codec-params='{json.dumps(params)}' out='{out}'")
            if run.returncode != 0 or not out.exists():
                raise RuntimeError(f"flwr run for {codec} failed:\n{(run.stdout + run.stderr)[-3000:]}")
            results.append(json.loads(out.read_text()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("wire_deploy.json"))
    parser.add_argument("--codecs", default=",".join(CODECS), help=f"comma-separated, from {', '.join(CODECS)}")
    args = parser.parse_args(argv)
    names = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in names if c not in CODECS]
    if unknown:
        parser.error(f"unknown codec(s) {unknown}; choose from {', '.join(CODECS)}")
    with tempfile.TemporaryDirectory(prefix="fl-sim-wire-") as tmp:
        results = measure({c: CODECS[c] for c in names}, Path(tmp))
    print("codec  replies  counted_bits  payload_bytes  message_bytes  framing_bytes  server_bits_per_reply")
    for r in results:
        for row in r["rows"]:
            framing = row["message_bytes"] - row["payload_bytes"]
            print(f"{r['codec']:6s} round {row['round']} node {row['node'] % 10000:4d}  {row['counted_bits']:8d}  "
                  f"{row['payload_bytes']:8d}  {row['message_bytes']:8d}  {framing:6d}  "
                  f"{row.get('server_round_uplink_bits', 0) / 2:.0f}")
    atomic_write(args.out, json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
