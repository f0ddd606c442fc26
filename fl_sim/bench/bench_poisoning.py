"""Poisoning figures of the README ("Bad and malicious client replies"): what the reply guards stop.

Every case runs the quickstart in memory (fl_sim.engine.inline.InMemoryGrid: the real strategy, ClientApp and
mods; the same rounds as ``fl-sim run`` without the transport) with attackers altering their replies
after the mod, as a malicious node would:

* ``zero`` (the model pulled to zero): the first reply of each round (the lowest sampled client id)
  carries an all-zero model with its honest num-examples, so Δ = −w. For ``norm_bound`` 10 (the default)
  and 3, on the natural partition and Dirichlet α = 0.1 and 0.5: final accuracy with and without the
  attacker, replies rejected, and where the attacker sits among the round's replies: its update norm
  over the round's median norm, and its cosine with the coordinate-wise median update, against the
  range of the honest replies (both measured before the guards act).
* ``inner`` (many attackers): the 30% of clients with id mod 10 < 3 send w − 10 Δ_i (their update
  sign-flipped and scaled x10); FedAvg, FedMedian, FedTrimmedAvg (β = 0.2) and Krum
  (``num_malicious_nodes=3``) as the inner strategy, with the default guards, on iid and natural
  partitions, with and without the attackers.

Usage: ``python -m fl_sim.bench.bench_poisoning [--table {zero,inner,all}] [--rounds N] [--quick]
[--out bench_out/poisoning.json]``. The README's figures: ``--table zero --rounds 40`` and
``--table inner --rounds 30`` (about 1 minute a case on 2 cores). ``--quick``: 3 rounds of 20 clients.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from flwr.app import Array
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fl_sim.config import load_config
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.runs.results import atomic_write
from fl_sim.runs.simulation import server_loop
from fl_sim.clients.app import make_client_app
from fl_sim.engine.inline import InMemoryGrid
from fl_sim.wire import keys

INNERS: dict[str, Callable[[], Any] | None] = {
    "fedavg": None,  # the strategy's own FedAvg
    "fedmedian": lambda: FedMedian(fraction_evaluate=0.0, min_evaluate_nodes=0),
    "trimmed": lambda: FedTrimmedAvg(beta=0.2, fraction_evaluate=0.0, min_evaluate_nodes=0),
    "krum": lambda: Krum(num_malicious_nodes=3, fraction_evaluate=0.0, min_evaluate_nodes=0),
}
PARTITIONS = {"natural": [], "iid": ["data.partition=iid"],
              "dirichlet0.1": ["data.partition=dirichlet", "data.alpha=0.1"],
              "dirichlet0.5": ["data.partition=dirichlet", "data.alpha=0.5"]}


def _replace_arrays(reply, make: Callable[[str, np.ndarray], np.ndarray]) -> None:
    arrays = reply.content[keys.ARRAYS]
    for name in list(arrays.keys()):
        arrays[name] = Array(make(name, arrays[name].numpy()))


def run_case(partition: str, *, rounds: int, attack: str | None, inner: str = "fedavg", norm_bound: float = 10.0,
             quick: bool = False) -> dict[str, Any]:
    """One in-memory quickstart run: final accuracy, replies rejected, and the per-reply position of the
    attackers' and the honest replies' updates among their round's (before the guards)."""
    sets = [f"rounds={rounds}", f"strategy.guards.norm_bound={norm_bound}", *PARTITIONS[partition]]
    if quick:
        sets += ["clients=20", "clients_per_round=5", "model.hidden=[16]"]
    cfg = load_config("quickstart", sets)
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    if INNERS[inner] is not None:
        strategy.inner = INNERS[inner]()
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    per_round = cfg.clients_per_round
    count = {"n": 0}
    attackers: set[tuple[int, int]] = set()  # (round, client id)

    def tamper(reply):
        first = count["n"] % per_round == 0
        rnd = count["n"] // per_round + 1
        count["n"] += 1
        if reply.has_error():
            return reply
        cid = int(reply.content[keys.METRICS][keys.M_CID])
        if attack == "zero" and first:
            _replace_arrays(reply, lambda name, a: np.zeros_like(a))
        elif attack == "sign_flip" and cid % 10 < 3:
            w = strategy._global_arrays
            _replace_arrays(reply, lambda name, a: (w[name].numpy() - 10 * (a - w[name].numpy())).astype(a.dtype))
        else:
            return reply
        attackers.add((rnd, cid))
        return reply

    grid.tamper = tamper
    positions: list[tuple[bool, float, float]] = []  # (attacker, ‖Δ_i‖ / median ‖Δ‖, cos(Δ_i, median Δ))
    apply_guards = strategy.apply_guards

    def measured(rnd, usable):
        deltas = torch.stack([r.data for r in usable]).to(torch.float64)
        median = deltas.median(dim=0).values
        norms = deltas.norm(dim=1)
        cosine = deltas @ median / (norms * median.norm()).clamp(min=1e-300)
        for r, n, c in zip(usable, (norms / norms.median()).tolist(), cosine.tolist()):
            positions.append(((rnd, r.cid) in attackers, n, c))
        return apply_guards(rnd, usable)

    strategy.apply_guards = measured
    rows: list[dict] = []
    logging.getLogger("fl_sim").setLevel(logging.CRITICAL)  # every rejection would be logged
    server_loop(grid, exp, strategy, None, lambda r, row: rows.append(dict(row)))
    out: dict[str, Any] = {"partition": partition, "attack": attack, "inner": inner, "norm_bound": norm_bound,
                           "rounds": rounds, "final_accuracy": rows[-1]["test_accuracy"],
                           "rejected": int(sum(r.get("clients_rejected", 0) for r in rows[1:]))}
    for who, flag in (("honest", False), ("attacker", True)):
        pos = np.array([(n, c) for a, n, c in positions if a == flag]).reshape(-1, 2)
        if len(pos):
            out[who] = {"replies": len(pos), "norm_ratio_min": float(pos[:, 0].min()),
                        "norm_ratio_median": float(np.median(pos[:, 0])), "norm_ratio_max": float(pos[:, 0].max()),
                        "cosine_min": float(pos[:, 1].min()), "cosine_median": float(np.median(pos[:, 1])),
                        "cosine_max": float(pos[:, 1].max())}
    return out


def cases(table: str) -> list[dict[str, Any]]:
    """The keyword arguments of every case of a table (rounds and quick aside)."""
    out = []
    if table in ("zero", "all"):
        for partition in ("natural", "dirichlet0.1", "dirichlet0.5"):
            for bound in (10.0, 3.0):
                out += [dict(partition=partition, attack=a, norm_bound=bound) for a in (None, "zero")]
    if table in ("inner", "all"):
        for inner in INNERS:
            out += [dict(partition="iid", attack=a, inner=inner) for a in (None, "sign_flip")]
            out.append(dict(partition="natural", attack=None, inner=inner))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", choices=("zero", "inner", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=None, help="default: 40 (zero), 30 (inner), 3 with --quick")
    parser.add_argument("--smoke", "--quick", dest="quick", action="store_true",
                        help="3 rounds of 20 clients and a smaller model (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/poisoning.json"))
    args = parser.parse_args(argv)
    results = []
    for kw in cases(args.table):
        rounds = args.rounds or (3 if args.quick else 30 if "inner" in kw else 40)
        row = run_case(rounds=rounds, quick=args.quick, **kw)
        results.append(row)
        print(json.dumps(row), flush=True)
    atomic_write(args.out, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
