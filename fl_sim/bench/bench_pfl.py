"""Benchmark peer: Apple's pfl-research (``pfl``, tested with 0.6.0) on fl-sim's quickstart, side by side.

pfl is a benchmark peer, not a dependency: install it in its own environment (``pip install pfl==0.6.0``,
which shares torch with fl-sim's) and run this module with that environment's Python; without pfl it
prints why and exits 0 (nothing measured).

The same computation as ``fl-sim run quickstart`` with FedAvg, as far as pfl exposes it:

* the same clients and data: fl_sim.data.load_federated of the quickstart config (Synthetic(1, 1),
  natural power-law partition), each pfl user a client's (x, y) rows;
* the same initial weights: fl_sim.models.build_model(..., seed) (the MLP of 14,210 parameters), wrapped
  in a module with pfl's ``loss``/``metrics`` methods;
* the same client sampling: the cohort of round t is fl-sim's
  ``numpy_generator(seed, t, "sample-clients").choice(eligible, k, replace=False)`` (sorted), fed to pfl's
  ``FederatedDataset`` as its user sampler (checked: the users pfl trains are those clients);
* local SGD with fl-sim's learning rate, batch size and epochs; the server averages the updates
  weighted by the number of examples (``WeightByDatapoints``) and applies them with a central SGD of
  learning rate 1 (FedAvg). pfl iterates a user's batches in data order (fl-sim shuffles with a
  per-client generator), so the models agree in distribution, not bit for bit: both final accuracies
  are reported.

pfl runs in one process, or in ``--processes`` > 1 worker processes (``torch.distributed.run``, gloo:
pfl's own multi-worker simulation, each worker training its share of the cohort). fl-sim runs
``fl-sim run``'s code (run_experiment) on the vectorized and inline backends in the same harness (timers
at each round's end, no memory sampler). Every measurement runs in its own process; repeats alternate who goes first. Reported: set-up (from the call
to the first round: data, model, engine; imports not included), steady seconds and CPU seconds (every
worker process's) per round (rounds 2..R-1), the ratio pfl's best / fl-sim's.

Usage (pfl's environment, fl-sim's repository on PYTHONPATH; ``fl-sim bench pfl`` runs it with this Python):
``python -m fl_sim.bench.bench_pfl --per-round 10,100 --rounds 12 --processes 1,2 --contention both``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["pfl_missing", "run_pfl", "main"]

T_IMPORT = time.perf_counter()


def pfl_missing() -> str:
    """'' when pfl can be imported here, else a one-line reason."""
    try:
        import pfl  # noqa: F401
        from pfl.model.pytorch import PyTorchModel  # noqa: F401
    except ImportError as exc:
        return (f"pfl is not importable in this environment ({exc}); install the peer in its own environment "
                "(pip install pfl==0.6.0) and run this module with that environment's Python")
    return ""


def cohorts(cfg, eligible) -> list[list[int]]:
    """fl-sim's client sampling, rounds 1..R (fl_sim.strategies UpdateStrategy.sample; plain_loop)."""
    import numpy as np

    from fl_sim.rng import numpy_generator

    k = cfg.sampled_per_round()
    eligible = np.sort(eligible)
    return [sorted(numpy_generator(cfg.seed, t, "sample-clients").choice(eligible, size=min(k, len(eligible)),
                                                                         replace=False).tolist())
            for t in range(1, cfg.rounds + 1)]


def run_pfl(per_round: int, rounds: int, progress=None) -> dict[str, Any]:
    """pfl's FedAvg on the quickstart in this process (or this torch.distributed worker)."""
    t_call = time.perf_counter()
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module as ops
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    from fl_sim.bench.bench_round import workload_config
    from fl_sim.data import load_federated
    from fl_sim.models import build_model

    torch.set_num_threads(1)  # one thread per worker process, as fl-sim's per-client paths
    cfg = workload_config("quickstart", per_round, rounds)
    data = load_federated(cfg.data, num_clients=cfg.clients, seed=cfg.seed)
    net = build_model(cfg.model.name, data.input_shape, data.num_classes, hidden=cfg.model.hidden, seed=cfg.seed)

    class Peer(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def loss(self, x, y, eval=False):  # noqa: A002 - pfl's signature
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=False):  # noqa: A002
            self.eval()
            out = self(x)
            n = len(y)
            return {"loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), n),
                    "accuracy": Weighted(float((out.argmax(1) == y).sum()), n)}

    model_module = Peer(net)
    x_all, y_all = data.source.x, data.source.y
    users = {int(c): (x_all[torch.from_numpy(data.parts[c])], y_all[torch.from_numpy(data.parts[c])])
             for c in data.eligible_clients.tolist()}
    order = [c for cohort in cohorts(cfg, data.eligible_clients) for c in cohort]
    trained: list[int] = []
    position = iter(order)

    def sampler():
        return next(position)

    def make_dataset(uid):
        trained.append(int(uid))
        x, y = users[int(uid)]
        return Dataset(raw_data=[x, y], user_id=uid)

    train_data = FederatedDataset(make_dataset, sampler)
    model = PyTorchModel(model=model_module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(model_module.parameters(), lr=1.0))
    t = cfg.train
    marks: list[float] = []
    cpu: list[float] = []  # this process's CPU seconds at the same marks

    class Timer(TrainingProcessCallback):
        def on_train_begin(self, *, model):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            marks.append(time.perf_counter())
            cpu.append(time.process_time())
            if progress is not None:
                progress(central_iteration + 1)
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                           train_cohort_size=per_round, val_cohort_size=0),
        backend=SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=t.lr, local_num_epochs=t.local_epochs,
                                              local_batch_size=t.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[Timer()],
    )
    world = ops().distributed.world_size
    rank = ops().distributed.global_rank
    x_test, y_test = data.test_data()
    with torch.no_grad():
        out = net(x_test)
        acc = float((out.argmax(1) == y_test).float().mean())
        loss = float(F.cross_entropy(out, y_test))
    per = [b - a for a, b in zip(marks, marks[1:])]
    expected = [c for i, c in enumerate(order) if (i % (world)) == rank] if world > 1 else order
    return {
        "processes": world, "rank": rank,
        "setup_s": marks[0] - t_call,  # as bench_round's: data, model, engine, until the first round starts
        "process_setup_s": marks[0] - T_IMPORT,  # from this module's import (pfl's and torch's imports included)
        "round_s": per,
        "steady_round_s": statistics.fmean(per[1:-1] or per[1:] or per),
        "steady_cpu_s": statistics.fmean(_steady([b - a for a, b in zip(cpu, cpu[1:])])),  # this process's
        "final_test_accuracy": acc, "final_test_loss": loss,
        "same_sampling": trained == expected,
    }


# ============================================================================ orchestration
def _steady(per: list[float]) -> list[float]:
    return per[1:-1] or per[1:] or per


def run_fl_sim(mode: str, per_round: int, rounds: int) -> dict[str, Any]:
    """fl-sim's ``fl-sim run`` of the same quickstart on ``simulation.backend=mode`` in this process, timed
    as :func:`run_pfl` is (no memory sampler beside it, unlike ``bench round``)."""
    import logging
    import shutil

    from fl_sim.bench.bench_round import workload_config
    from fl_sim.runs.simulation import run_experiment

    t_call = time.perf_counter()
    logging.disable(logging.INFO)
    cfg = workload_config("quickstart", per_round, rounds, mode)
    marks: list[float] = []
    cpu: list[float] = []
    rows: list[dict] = []

    def progress(rnd: int, row: dict) -> None:
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        rows.append(row)

    run_dir = Path(tempfile.mkdtemp(prefix="bench-pfl-"))
    try:
        run_experiment(cfg, run_dir, progress)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    per = [b - a for a, b in zip(marks, marks[1:])]
    return {"processes": 1, "rank": 0, "setup_s": marks[0] - t_call, "process_setup_s": marks[0] - T_IMPORT,
            "round_s": per, "steady_round_s": statistics.fmean(_steady(per)),
            "steady_cpu_s": statistics.fmean(_steady([b - a for a, b in zip(cpu, cpu[1:])])),
            "final_test_accuracy": rows[-1]["test_accuracy"], "final_test_loss": rows[-1]["test_loss"]}


def _worker(spec: dict[str, Any], result: Path) -> None:
    res = (run_pfl(spec["per_round"], spec["rounds"]) if spec["mode"] == "pfl"
           else run_fl_sim(spec["mode"], spec["per_round"], spec["rounds"]))
    Path(f"{result}.cpu{res['rank']}").write_text(str(res["steady_cpu_s"]))  # every worker's CPU, summed below
    if res["rank"] == 0:
        res["spec"] = spec
        res["loadavg"] = os.getloadavg()
        result.write_text(json.dumps(res))


def _measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in child processes (pfl with 1 or N workers, or an fl-sim mode), with
    ``spec["busy"]`` CPU-bound processes beside it."""
    from fl_sim.bench.bench_round import busy_processes, stop_busy

    procs = busy_processes(spec.get("busy", 0))
    try:
        if procs:
            time.sleep(0.5)
        with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
            result = Path(f.name)
        args = ["-m", "fl_sim.bench.bench_pfl", "--worker", json.dumps(spec), "--result", str(result)]
        n = spec.get("processes", 1)
        cmd = [sys.executable, *args] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        try:
            out = json.loads(result.read_text())
            out["wall_s"] = time.perf_counter() - t0
            out["steady_cpu_s"] = sum(float(Path(f"{result}.cpu{r}").read_text()) for r in range(n))  # all workers
            return out
        except (OSError, ValueError):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
            return {"spec": spec, "error": f"exit code {proc.returncode}: {tail}"}
        finally:
            result.unlink(missing_ok=True)
            for r in range(n):
                Path(f"{result}.cpu{r}").unlink(missing_ok=True)
    finally:
        stop_busy(procs)


def _label(spec: dict[str, Any]) -> str:
    return f"pfl-{spec['processes']}p" if spec["mode"] == "pfl" else f"fl-sim {spec['mode']}"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(prog="bench_pfl", description=__doc__.split("\n")[0])
    p.add_argument("--per-round", default="10,100")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--processes", default="1,2", help="pfl worker processes, e.g. 1,2")
    p.add_argument("--fl-sim-modes", default="vectorized,inline", help="fl-sim modes of bench round to run beside")
    p.add_argument("--contention", default="off", choices=("off", "on", "both"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for the test suite: 2 clients a round, 3 rounds, 1 pfl process, fl-sim vectorized "
                        "(fl-sim alone when pfl is missing)")
    p.add_argument("--out", type=Path, default=Path("bench_out/pfl.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        _worker(json.loads(a.worker), a.result)
        return None
    if a.smoke:
        a.per_round, a.rounds, a.processes, a.fl_sim_modes, a.repeats, a.contention = "2", 3, "1", "vectorized", 1, "off"
    missing = pfl_missing()
    if missing:
        print(f"bench_pfl: pfl skipped: {missing}")
        if not a.smoke:  # nothing to compare with: write why and stop
            _write(a.out, {"skipped": missing})
            return None
    from fl_sim.bench.bench_round import busy_count
    from fl_sim.bench.bench_scale import machine

    busy = {"off": [0], "on": [busy_count(2)], "both": [0, busy_count(2)]}[a.contention]
    variants = [] if missing else [{"mode": "pfl", "processes": int(n)} for n in a.processes.split(",") if n]
    variants += [{"mode": m} for m in a.fl_sim_modes.split(",") if m]
    runs = []
    for rep in range(a.repeats):
        for k in [int(x) for x in a.per_round.split(",") if x]:
            order = variants if rep % 2 == 0 else variants[::-1]
            for b in (busy if rep % 2 == 0 else busy[::-1]):
                for v in order:
                    spec = {**v, "workload": "quickstart", "per_round": k, "rounds": a.rounds, "busy": b, "repeat": rep}
                    res = _measure(spec, a.timeout)
                    runs.append(res)
                    if "error" in res:
                        print(f"k={k:<4} busy {b} {_label(spec):<20} {res['error']}", flush=True)
                    else:
                        print(f"k={k:<4} busy {b} {_label(spec):<20} setup {res['setup_s']:5.2f} s  steady "
                              f"{res['steady_round_s']:.4f} s/round ({res['steady_cpu_s']:.4f} CPU s)  accuracy {res['final_test_accuracy']:.4f}  "
                              f"load {res['loadavg'][0]:.1f}"
                              + ("" if spec["mode"] != "pfl" else f"  same sampling {res['same_sampling']}"),
                              flush=True)
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "error" not in r:
            groups.setdefault((r["spec"]["per_round"], r["spec"]["busy"], _label(r["spec"])), []).append(r)
    print(f"\n{'k':>5} {'busy':>4} {'engine':<20} {'setup s':>8} {'s/round':>9} {'CPU s':>8} {'pfl best / this':>16}  load")
    for (k, b, label), rs in sorted(groups.items()):
        steady = statistics.median(r["steady_round_s"] for r in rs)
        pfl_best = min((statistics.median(x["steady_round_s"] for x in g) for (k2, b2, l2), g in groups.items()
                        if k2 == k and b2 == b and l2.startswith("pfl")), default=None)
        row = {"per_round": k, "busy": b, "engine": label, "steady_round_s": steady,
               "steady_cpu_s": statistics.median(r["steady_cpu_s"] for r in rs),
               "setup_s": statistics.median(r["setup_s"] for r in rs),
               "pfl_best_over_this": None if pfl_best is None else pfl_best / steady,
               "loadavg": [round(r["loadavg"][0], 1) for r in rs]}
        rows.append(row)
        print(f"{k:>5} {b:>4} {label:<20} {row['setup_s']:8.2f} {steady:9.4f} {row['steady_cpu_s']:8.4f} "
              f"{row['pfl_best_over_this'] or float('nan'):16.2f}  "
              f"{row['loadavg']}")
    data = {"machine": machine(), "pfl_missing": missing, "smoke": a.smoke, "runs": runs, "summary": rows}
    _write(a.out, data)
    print(f"wrote {a.out}", file=sys.stderr)
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


if __name__ == "__main__":
    main()
