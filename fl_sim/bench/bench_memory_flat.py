"""Flat memory over a long run of a stateful method: process-tree memory at every round of 200.

A method with client-side error feedback (configs/topk_ef.yaml: top-k 1% + classic EF, MLP of
14,210 parameters on Synthetic(1, 1)) runs ``--rounds`` rounds (default 200) with ``--clients``
clients (default 200), ``--per-round`` per round (default 20), through ``fl-sim run``'s code path
(fl_sim.runs.simulation.run_experiment, Ray or inline backend). Every client has participated after
about 50 rounds (P(not yet) = (1 - 20/200)^50 = 0.5%), so the residual store stops growing there;
after that warm-up the peak memory must stay flat (no per-round leak: Flower users report 100
clients x 100 rounds exhausting 48 GB).

Measured at the end of every round (fl_sim's progress callback): RSS and PSS summed over this
process and all its descendants (Ray's GCS, raylet and workers included; fl_sim.bench.bench_scale.
TreeMemory: RSS over-counts pages shared between processes, PSS does not), and the peak RSS so
far. Prints rounds 10, 50, 100, 150, 200 (or the last), the growth from round 50 to the end, and
writes the per-round series as JSON (``--out``) and a PNG (``--plot``).

Usage::

    fl-sim bench memory-flat --backend ray --plot docs/memory_flat.png \
        --out docs/perf/memory_flat.json [--set simulation.residual_store=disk]

(or ``python -m fl_sim.bench.bench_memory_flat``). ``--smoke``: tiny sizes (inline backend, 4 clients,
2 per round, 3 rounds) for the test suite; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fl_sim.bench.bench_codecs import write_json
from fl_sim.bench.bench_scale import TreeMemory, machine

__all__ = ["measure", "main"]

REPORT_ROUNDS = (10, 50, 100, 150, 200)


def measure(backend: str, rounds: int, clients: int, per_round: int, sets: list[str]) -> dict[str, Any]:
    """One run in this process; returns per-round memory rows and the run's final metrics."""
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import run_experiment

    over = [f"rounds={rounds}", f"clients={clients}", f"clients_per_round={per_round}", "eval_every=0",
            f"simulation.backend={backend}", *sets]
    cfg = load_config("topk_ef", over)
    rows: list[dict[str, Any]] = []
    with TreeMemory(0.2, pss_interval=5.0) as mem:
        t0 = time.perf_counter()

        def progress(rnd: int, row: dict) -> None:
            m = mem.mark(f"round-{rnd}")
            rows.append({"round": rnd, "t_s": time.perf_counter() - t0, "rss": m["rss"], "pss": m["pss"],
                         "peak_rss": m["peak_rss"], "peak_pss": m["peak_pss"], "cpu_s": m["cpu_s"]})

        run_dir = Path(tempfile.mkdtemp(prefix="bench-memflat-"))
        try:
            summary = run_experiment(cfg, run_dir / "run", progress=progress)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {"backend": backend, "rounds": rounds, "clients": clients, "per_round": per_round, "set": sets,
            "rows": rows, "memory_peak": mem.summary(), "final_test_accuracy": summary.get("final_test_accuracy"),
            "total_s": time.perf_counter() - t0, "loadavg": os.getloadavg()}


def report(res: dict[str, Any]) -> list[str]:
    """Lines: memory at the report rounds, growth after warm-up."""
    gib = 1024**3
    by = {r["round"]: r for r in res["rows"]}
    last = max(by)
    lines = [f"{res['backend']}: top-k+EF, {res['clients']} clients, {res['per_round']}/round, "
             f"{res['rounds']} rounds {' '.join(res['set'])}; {res['total_s']:.0f} s, "
             f"final accuracy {res['final_test_accuracy']:.3f}"]
    for r in sorted({*(x for x in REPORT_ROUNDS if x in by), last}):
        row = by[r]
        lines.append(f"  round {r:4d}: RSS {row['rss'] / gib:.3f} GiB  PSS {row['pss'] / gib:.3f} GiB  "
                     f"peak RSS so far {row['peak_rss'] / gib:.3f} GiB")
    if 50 in by:
        a, b = by[50], by[last]
        lines.append(f"  round 50 -> {last}: PSS {1024 * (b['pss'] - a['pss']) / gib:+.1f} MiB, peak RSS "
                     f"{1024 * (b['peak_rss'] - a['peak_rss']) / gib:+.1f} MiB")
    return lines


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=80)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for res, c in zip(results, colors):
        rr = [r for r in res["rows"] if r["round"] > 0]
        label = f"{res['backend']} {' '.join(s.split('.')[-1] for s in res['set'])}".strip()
        ax.plot([r["round"] for r in rr], [r["pss"] / 1024**3 for r in rr], "-", color=c, lw=1.2,
                label=f"{label}: PSS")
        ax.plot([r["round"] for r in rr], [r["peak_rss"] / 1024**3 for r in rr], "--", color=c, lw=1,
                label=f"{label}: peak RSS so far")
    ax.axvline(50, color="grey", lw=0.8, ls=":")
    ax.text(51, ax.get_ylim()[0], " every client seen (99.5%)", fontsize=7, color="grey", va="bottom")
    ax.set(xlabel="round", ylabel="GiB (process tree)", ylim=(0, None),
           title=f"top-k + client EF, {results[0]['clients']} clients, {results[0]['per_round']}/round: "
                 "memory at the end of each round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="bench_memory_flat", description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="ray", help="ray and/or inline, comma-separated (each in its own process)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--set", dest="set_", action="append", default=[], help="config override (repeatable)")
    p.add_argument("--out", type=Path, default=Path("bench_out/memory_flat.json"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.backend, a.rounds, a.clients, a.per_round = "inline", 3, 4, 2
    if a.worker:  # one measurement, alone in its process tree
        res = measure(a.worker, a.rounds, a.clients, a.per_round, a.set_)
        Path(a.result).write_text(json.dumps(res))
        return [res]
    results = []
    for backend in [b for b in a.backend.split(",") if b]:
        result = Path(tempfile.mkstemp(prefix="memflat-", suffix=".json")[1])
        cmd = [sys.executable, "-m", "fl_sim.bench.bench_memory_flat", "--worker", backend, "--rounds", str(a.rounds),
               "--clients", str(a.clients), "--per-round", str(a.per_round), "--result", str(result)]
        for s in a.set_:
            cmd += ["--set", s]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{backend} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
        res = json.loads(result.read_text())
        result.unlink()
        print("\n".join(report(res)), flush=True)
        results.append(res)
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    for res in results:
        old[f"{res['backend']} {' '.join(res['set'])}".strip()] = res
    old["_machine"] = machine()
    write_json(old, a.out)
    if a.plot:
        print(f"wrote {plot([v for k, v in old.items() if not k.startswith('_')], a.plot)}")
    return results


if __name__ == "__main__":
    main()
