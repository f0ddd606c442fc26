"""Per-message cost of a reply, piece by piece: what is fl-sim's and what is Flower's.

In the vectorized backend a round's training is batched, so at 1,000 clients a round the rest of a
reply's life dominates: the client builds its reply (records), the server validates and decodes it.
This script times each step for one reply of a workload's model (``--workload quickstart``: the MLP of
14,210 parameters; ``lenet``: LeNet-5, 61,706) in this process, on one torch thread, and labels it
``fl-sim`` (code in this repository) or ``Flower`` (flwr's record classes and its strategy checks).
Figures are the minimum over repeats of the mean over ``--number`` calls (microseconds per reply), and
x 1,000 clients (milliseconds per 1,000-client round). Not timed here: Flower's ``Message`` objects (reply
construction, metadata) and its grid/ClientApp dispatch, which ``bench round --profile`` covers.

Usage: ``fl-sim bench messages [--workload quickstart] [--number 2000] [--out bench_out/messages.json]``
(``python -m fl_sim.bench.bench_messages`` the same).
"""

from __future__ import annotations

import argparse
import json
import os
import timeit
from pathlib import Path
from typing import Any

__all__ = ["steps", "main"]


def steps(workload: str) -> list[tuple[str, str, Any]]:
    """(owner, step, callable) of one reply's life, in order."""
    import numpy as np
    import torch
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

    from fl_sim.wire import keys
    from fl_sim.models import build_model
    from fl_sim.wire.records import _npy_header, array_record, flatten_with_bits, ndarray_to_array, state_dict_to_arrays
    from fl_sim.strategies.guards import all_finite

    shape, classes = ((60,), 10) if workload == "quickstart" else ((1, 28, 28), 10)
    model = build_model("mlp" if workload == "quickstart" else "lenet5", shape, classes,
                        hidden=[200] if workload == "quickstart" else None, seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    nds = {k: v.numpy() for k, v in state.items()}
    arrays = {k: ndarray_to_array(v) for k, v in nds.items()}
    record = state_dict_to_arrays(state)
    metrics = MetricRecord({keys.NUM_EXAMPLES: 100, keys.TRAIN_LOSS: 1.0, keys.M_CID: 7})
    content = RecordDict({keys.ARRAYS: record, keys.METRICS: metrics})
    flat, _ = flatten_with_bits(record)
    replies = [content] * 2  # Flower's consistency check per reply: its cost over 2 replies minus over 1
    from flwr.app import Array

    blobs = [(a.dtype, a.shape, a.stype, a.data) for a in arrays.values()]
    return [
        ("fl-sim", "state dict -> npy bytes (ndarray_to_array but Array())",
         lambda: [b"".join((_npy_header(v.dtype, v.shape)[1], v.reshape(-1).view(np.uint8))) for v in nds.values()]),
        ("Flower", "Array(dtype, shape, stype, data) per array", lambda: [Array(dtype=d, shape=s, stype=t, data=b)
                                                                          for d, s, t, b in blobs]),
        ("Flower", "ArrayRecord of the arrays (typed-dict set)", lambda: array_record(arrays)),
        ("Flower", "MetricRecord of the reply's 3 metrics",
         lambda: MetricRecord({keys.NUM_EXAMPLES: 100, keys.TRAIN_LOSS: 1.0, keys.M_CID: 7})),
        ("Flower", "RecordDict(arrays, metrics)", lambda: RecordDict({keys.ARRAYS: record, keys.METRICS: metrics})),
        ("fl-sim", "flatten_with_bits (read the arrays, one vector)", lambda: flatten_with_bits(record)),
        ("fl-sim", "value check: guards.all_finite (numpy)", lambda: all_finite(flat)),
        ("(was)", "value check: torch.isfinite(x).all()", lambda: bool(torch.isfinite(flat).all())),
        ("Flower", "validate_message_reply_consistency, per reply",
         lambda: validate_message_reply_consistency(replies, keys.NUM_EXAMPLES, True)),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench_messages", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="quickstart", choices=("quickstart", "lenet"))
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes for the test suite: 5 calls, 1 repeat")
    p.add_argument("--out", type=Path, default=Path("bench_out/messages.json"))
    a = p.parse_args(argv)
    if a.smoke:
        a.number, a.repeat = 5, 1
    import torch

    torch.set_num_threads(1)
    rows = []
    print(f"{'owner':<7} {'step':<58} {'us/reply':>9} {'ms/1000':>8}   (load {os.getloadavg()[0]:.1f})")
    totals: dict[str, float] = {}
    for owner, name, fn in steps(a.workload):
        us = 1e6 * min(timeit.repeat(fn, number=a.number, repeat=a.repeat)) / a.number
        if name.startswith("validate_message_reply_consistency"):
            us /= 2  # it walks both replies: per reply
        rows.append({"owner": owner, "step": name, "us_per_reply": us})
        totals[owner] = totals.get(owner, 0.0) + us
        print(f"{owner:<7} {name:<58} {us:9.1f} {us:8.1f}")
    for owner in ("fl-sim", "Flower"):
        print(f"{'total':<7} {owner:<58} {totals.get(owner, 0.0):9.1f} {totals.get(owner, 0.0):8.1f}")
    data = {"workload": a.workload, "smoke": a.smoke, "loadavg": os.getloadavg(), "steps": rows,
            "total_us_per_reply": {k: totals.get(k, 0.0) for k in ("fl-sim", "Flower")}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(a.out)
    return data


if __name__ == "__main__":
    main()
