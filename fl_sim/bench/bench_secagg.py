"""SecAgg+ cost benchmark: protocol bits and wall time per round at 10, 100 and 1,000 clients per round.

One SecAgg+ round (fl_sim.strategies.secagg.SecAggPlusGrid over the in-memory grid, every client
behind fl_sim.clients.secagg_mod) with a stand-in for local training: each client returns a
Count Sketch-shaped payload of ``--dim`` float32 entries (a FetchSGD table), so the figures are the
protocol's alone. For each number of clients n it runs the neighbourhood SecAgg+ uses,
``num_shares`` = 2⌈log2 n⌉ + 1 ([Bell-2020]: O(log n) neighbours), and, up to ``--full-up-to`` clients,
the complete graph (every client a neighbour of every other: the original SecAgg's cost) side by side;
t = half the shares. ``--drop`` makes that fraction of clients drop after sharing keys (their masks are
then reconstructed by the server).

Reported per configuration: protocol bits each client sends beyond its payload (public keys, encrypted
shares, field expansion, unmasking shares) and their ratio to the payload's bits; downlink protocol bits
per client; wall time of the round (all clients and the server run in this one process: the sum of
their work) and of the server's unmasking.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fl_sim.clients.secagg_mod import secagg_mod
from fl_sim.engine.inline import InMemoryGrid
from fl_sim.strategies.secagg import SecAggPlusGrid
from fl_sim.wire import keys
from fl_sim.wire.secagg import RECORD, SecAggKey, Stage, log_neighbours


def _client(dim: int, drop: set[int]):
    def train(msg: Message, context) -> Message:
        cid = int(msg.content[keys.CONFIG][keys.CID])
        rng = np.random.default_rng(cid)
        table = (rng.standard_normal(dim) * 0.01).astype(np.float32)
        meta = ConfigRecord({keys.P_CODEC: "count_sketch", keys.P_DIM: dim, keys.P_BITS: 32 * dim,
                             keys.P_META: "{}", keys.P_CID: cid})
        return Message(RecordDict({keys.ARRAYS: ArrayRecord({"table": Array(table)}), keys.PAYLOAD_META: meta,
                                   keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 50, keys.TRAIN_LOSS: 1.0})}),
                       reply_to=msg)

    def app(msg: Message, context) -> Message:
        rec = msg.content.get(RECORD)
        if rec is not None and rec[SecAggKey.STAGE] == Stage.COLLECT_MASKED_VECTORS and int(rec[keys.CID]) in drop:
            raise ConnectionError("dropped")
        return secagg_mod(msg, context, train)

    return app


def one_round(n: int, dim: int, shares: int, drop_fraction: float) -> dict:
    drop = set(range(0, n, max(1, round(1 / drop_fraction)))) if drop_fraction > 0 else set()
    inner = InMemoryGrid(_client(dim, drop), n)
    grid = SecAggPlusGrid(inner, None, num_shares=shares, reconstruction_threshold=max(2, (shares + 1) // 2))
    msgs = [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.SEED: 1, keys.CID: i, keys.CODEC: "count_sketch"})}),
                    message_type=MessageType.TRAIN, dst_node_id=node) for i, node in enumerate(inner.node_ids)]
    t0 = time.perf_counter()
    (reply,) = grid.send_and_receive(msgs)
    wall = time.perf_counter() - t0
    f = grid.last
    payload_bits = 32 * dim
    return {"clients": n, "dim": dim, "num_shares": shares, "threshold": f["secagg_threshold"],
            "dropped": int(f["secagg_dropped"]), "payload_bits": payload_bits,
            "extra_bits_per_client": f["secagg_bits"] / n,
            "extra_over_payload": f["secagg_bits"] / n / payload_bits,
            "down_bits_per_client": f["secagg_down_bits"] / n,
            **{f"{part}_bits_per_client": f[f"secagg_{part}_bits"] / n for part in ("keys", "shares", "expansion", "unmask")},
            "round_s": wall, "per_client_ms": 1e3 * (wall - f["secagg_unmask_s"]) / n,
            "unmask_s": f["secagg_unmask_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--dim", type=int, default=10_000)
    parser.add_argument("--full-up-to", type=int, default=30, help="also the complete graph up to this many clients")
    parser.add_argument("--drop", type=float, default=0.0, help="fraction dropping after sharing keys")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (4 and 6 clients, 64 entries): checks the benchmark end to end")
    parser.add_argument("--out", type=Path, default=Path("bench_out/secagg.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.dim, args.full_up_to = "4,6", 64, 6
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        graphs = [log_neighbours(n)] + ([n] if n <= args.full_up_to and n != log_neighbours(n) else [])
        for shares in graphs:
            rows.append(one_round(n, args.dim, shares, args.drop))
            r = rows[-1]
            print(f"n={n:5d} shares={shares:5d} t={r['threshold']:4d} dropped={r['dropped']:4d}  extra bits/client "
                  f"{r['extra_bits_per_client']:10.0f} ({r['extra_over_payload']:.4f} x payload)  down/client "
                  f"{r['down_bits_per_client']:9.0f}  round {r['round_s']:7.2f} s  per client "
                  f"{r['per_client_ms']:7.2f} ms  unmask {r['unmask_s']:6.2f} s", flush=True)
            print("        per client: keys {keys_bits_per_client:.0f}, shares {shares_bits_per_client:.0f}, field "
                  "expansion {expansion_bits_per_client:.0f}, unmask shares {unmask_bits_per_client:.0f} bits".format(**r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
