"""Client-side encoding stage of a round: per reply (compression_mod) against one block (cohort_encode).

What is timed is steps 3-5 of fl_sim.clients.mods for every client of a round: Δ = w' − w, error-feedback
compensate, encode, decode for the residual update, residual load/save. ``per-reply`` is what
``compression_mod`` does for each reply (inline backend, and the vectorized backend before its
batched encoding); ``block`` is fl_sim.clients.cohort_encode.encode_cohort for the whole round (one
chunk). Both get the real strategy's train messages (configure_train of the method's config, with the
quickstart task: Synthetic(1, 1), MLP of 14,210 parameters) and the same trained models (w plus a small
random update). Round 1 (no residuals yet, JIT warm-up) is not timed; rounds 2.. are, each client then
holding a residual. The payloads of the two paths are checked equal (bits, tensors).

Usage: ``fl-sim bench encoding [--methods topk_ef,qcs] [--per-round 100,1000] [--store disk,context]
[--rounds 3] [--threads 1] [--out bench_out/encoding.json]`` (or ``python -m fl_sim.bench.bench_encoding``).
Prints one line per point and the ratio per-reply / block, and writes the points as JSON. ``--smoke``:
tiny sizes (top-k + EF, 3 clients, 2 rounds) for the test suite; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord

from fl_sim.wire import keys
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.clients.app import client_id, make_client_app
from fl_sim.clients.cohort_encode import encode_cohort
from fl_sim.clients.mods import _encode_reply, _find_config
from fl_sim.bench.bench_codecs import write_json
from fl_sim.clients.residuals import DiskResidualStore
from fl_sim.config import load_config
from fl_sim.wire.records import flatten_arrays
from fl_sim.engine.inline import InMemoryGrid


def _setup(method: str, n: int, store: str, tmp: Path):
    cfg = load_config(method, [f"clients={n}", f"clients_per_round={n}", "eval_every=0"])
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    if store == "disk" and getattr(strategy, "error_feedback", "none") != "none":
        disk = DiskResidualStore.create(tmp / "residuals", dim=exp.dim, dtype=strategy.ef_dtype)
        strategy.train_config.update(disk.wire_config())
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    return exp, strategy, grid


def _messages(exp, strategy, grid, rnd: int):
    msgs = list(strategy.configure_train(rnd, exp.initial_arrays, ConfigRecord(), grid))
    return msgs, [grid.contexts[m.metadata.dst_node_id] for m in msgs]


def _locals(msgs, contexts, seed: int) -> torch.Tensor:
    w = flatten_arrays(msgs[0].content[keys.ARRAYS])
    g = torch.Generator().manual_seed(seed)
    return w + 0.01 * torch.randn(len(msgs), w.numel(), generator=g)


def per_reply(msgs, contexts, local):
    out = []
    for j, (m, ctx) in enumerate(zip(msgs, contexts)):
        config = _find_config(m)
        received = flatten_arrays(m.content[keys.ARRAYS])
        out.append(_encode_reply(config, ctx, client_id(m, ctx), received, local[j].clone())[0])
    return out


def block(msgs, contexts, local):
    cids = [client_id(m, ctx) for m, ctx in zip(msgs, contexts)]
    enc = encode_cohort(msgs, contexts, cids, local)
    from fl_sim.clients.precomputed import precomputed_key

    return [enc[precomputed_key("encode", m, c)].payload for m, c in zip(msgs, cids)]


def point(method: str, n: int, store: str, rounds: int) -> dict:
    times = {"per-reply": [], "block": []}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {mode: _setup(method, n, store, Path(tmp) / mode.replace("-", "_")) for mode in times}
        for rnd in range(1, rounds + 1):
            got = {}
            for mode, fn in (("per-reply", per_reply), ("block", block)):
                exp, strategy, grid = setups[mode]
                msgs, contexts = _messages(exp, strategy, grid, rnd)
                local = _locals(msgs, contexts, rnd)
                t0 = time.perf_counter()
                got[mode] = fn(msgs, contexts, local)
                if rnd > 1:
                    times[mode].append(time.perf_counter() - t0)
            for a, b in zip(got["per-reply"], got["block"]):
                assert a.bits == b.bits and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    mean = {m: statistics.mean(v) for m, v in times.items()}
    return {"method": method, "per_round": n, "store": store, **mean, "ratio": mean["per-reply"] / mean["block"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="bench_encoding", description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="topk_ef,qcs")
    ap.add_argument("--per-round", default="100,1000")
    ap.add_argument("--store", default="disk,context")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per point; the first is not timed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/encoding.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite (figures meaningless)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.methods, args.per_round, args.rounds = "topk_ef", "3", 2
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (round 1 is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'method':8} {'clients':>7} {'store':7} {'per-reply s':>12} {'block s':>9} {'ratio':>6}")
    rows = []
    for method in args.methods.split(","):
        for n in (int(v) for v in args.per_round.split(",")):
            for store in args.store.split(","):
                r = point(method, n, store, args.rounds)
                rows.append(r)
                print(f"{method:8} {n:7d} {store:7} {r['per-reply']:12.3f} {r['block']:9.3f} {r['ratio']:6.1f}", flush=True)
    write_json({"torch_threads": torch.get_num_threads(), "points": rows}, args.out)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
