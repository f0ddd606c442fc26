"""Round benchmark: fl-sim's FedAvg (Ray and inline backends) against a plain sequential PyTorch loop.

Workloads (``--workloads``):

* ``quickstart``: configs/quickstart.yaml (Synthetic(1, 1), 100 clients, MLP of 14,210 parameters,
  one local epoch of batch 32): a few milliseconds of training per client;
* ``lenet``: LeNet-5 (61,706 parameters) on a fabricated MNIST-format dataset, 100 clients of 800
  28x28 images (iid), one local epoch of batch 32 (25 steps): about 60 ms of training per client on
  one core here (200 images took 17 ms: below the 50 ms the overhead target is stated for);
* ``digits``: LeNet-5 on the embedded 8x8 digits (1,437 training images), 100 clients (iid, about 14
  images each), one local epoch of batch 8 (2 steps): the small-client regime of the vectorized backend.

``quickstart`` with more clients per round than its 100 clients uses ``clients`` = clients per round
(the same Synthetic(1, 1) generator and MLP, every client sampled).

For each workload and clients-per-round value (``--per-round 10,100``) the same R rounds run as
``plain`` (fl_sim.bench.plain_loop: same clients, data, sampling, local steps and weighted average,
no Flower), ``inline`` (``fl-sim run`` with ``simulation.backend: inline``: the strategy and
ClientApp with messages as function calls), ``vectorized`` (``simulation.backend: vectorized``: the
same, a round's clients trained in batched calls, fl_sim.engine.vectorized, with the automatic thread rule of
fl_sim.clients.cohort_threads; ``vectorized-1t``: the same on one thread, ``simulation.cohort_threads: 1``;
``vectorized-nt``: one thread per core always), ``auto`` (``fl-sim run``'s default engine choice,
fl_sim.engine.auto) and ``ray`` (``simulation.backend: ray``: Flower's simulation engine
with Ray actors, ``simulation.num_cpus`` CPUs per actor; ``--num-cpus 0.5,1,2`` tries several).
Every measurement runs in its own process; repeats alternate the modes so that they see the same
machine load. Reported per run (seconds): ``setup`` (until round 0 is evaluated: data, model,
Ray start for ``ray``), ``round 1`` (for Ray: actor start-up and each actor's own data/model build,
plus a round), ``steady`` (mean of rounds 2..R-1: no start-up, no evaluation), the ratio of
steady round times to the plain loop's, peak memory of the process tree, and the final test
loss (equal across modes: the same computation).

``--profile`` adds, for the largest clients-per-round value, where an fl-sim round goes: the
inline run with timers around our functions (training, config lookup, model load, records,
server aggregation, evaluation; Flower's ClientApp dispatch is the rest of a ClientApp call),
and an instrumented Ray run (bench_scale.instrumented_run) whose ClientApp reports its own time,
so that Flower's transport cost per client is the time messages were out x workers minus the
ClientApps' time.

``--contention on`` runs one CPU-bound process (a Python spin loop) beside each measurement per
``--busy-per-cores`` cores (default 2): the machine of a user running a second job; ``--contention both``
measures every mode idle and busy, alternating, and prints the two side by side.

``--scale`` adds the population run: the quickstart model and data generator with 10,000 clients,
10% (1,000) per round, 50 rounds, vectorized backend, its round times and the process tree's peak memory.

Usage: ``fl-sim bench round`` or ``python -m fl_sim.bench.bench_round [--quick] [--profile] [--scale]
[--out bench_out/round.json]``; ``--smoke``: quickstart, 2 clients a round, 3 rounds, plain and inline, one
repeat (no Ray): for the test suite, figures meaningless;
the vectorized backend's comparison: ``--workloads quickstart,digits --per-round 100,1000 --modes inline,vectorized``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fl_sim.bench.bench_scale import TreeMemory, add_worker_options, bench_root, machine, run_point_cmd, serve_worker

__all__ = ["workload_config", "measure", "run", "main"]

LENET_CLIENTS = 100
LENET_SAMPLES = 800  # per client: LeNet-5, one epoch of 25 batches, about 60 ms on one core
DEFAULT_ROUNDS = {"quickstart": 6, "lenet": 4, "digits": 6}
SCALE = {"clients": 10_000, "clients_per_round": 0.1, "rounds": 50}  # --scale (the population run)


def lenet_root() -> Path:
    from fl_sim.bench.plain_loop import fabricate_mnist

    root = bench_root() / f"mnist-{LENET_CLIENTS * LENET_SAMPLES // 1000}k"
    fabricate_mnist(root, LENET_CLIENTS * LENET_SAMPLES, 1000)
    return root


def workload_config(workload: str, per_round: int, rounds: int, backend: str = "inline", num_cpus: float = 1.0):
    """The RunConfig of a workload (FedAvg, evaluation at round 0 and R only)."""
    from fl_sim.config import config_from_dict, load_config

    common = [f"rounds={rounds}", "eval_every=0", f"clients_per_round={per_round}",
              f"simulation.backend={backend}", f"simulation.num_cpus={num_cpus}"]
    if workload == "quickstart":
        return load_config("quickstart", common + [f"clients={max(100, per_round)}"])
    if workload == "digits":
        return load_config("quickstart", common + [
            "name=bench-digits", "clients=100", "data.name=digits", "data.partition=iid", "model.name=lenet5",
            "train.batch_size=8", "train.lr=0.05"])
    if workload == "scale":  # --scale: 10,000 quickstart clients, 10% a round
        return load_config("quickstart", [f"rounds={rounds}", "eval_every=0", f"clients={SCALE['clients']}",
                                          f"clients_per_round={SCALE['clients_per_round']}",
                                          f"simulation.backend={backend}"])
    if workload == "lenet":
        cfg = config_from_dict({
            "name": "bench-lenet", "seed": 0, "rounds": rounds, "clients": LENET_CLIENTS,
            "clients_per_round": per_round, "eval_every": 0,
            "data": {"name": "mnist", "root": str(lenet_root()), "partition": "iid"},
            "model": {"name": "lenet5"},
            "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
            "strategy": {"name": "fedavg"},
            "simulation": {"backend": backend, "num_cpus": num_cpus},
        })
        return cfg
    raise SystemExit(f"unknown workload {workload!r}: use quickstart or lenet")


# ============================================================================ one measurement
def _steady(values: list[float]) -> list[float]:
    """Rounds 2..R-1 (no start-up in round 1, no evaluation in round R) when there are any."""
    return values[1:-1] or values[1:] or values


def _round_times(marks: dict[int, float], t_call: float, rounds: int, mem: TreeMemory) -> dict[str, Any]:
    per = [marks[r] - marks[r - 1] for r in range(1, rounds + 1)]
    cpu = [mem.marks[f"round-{r}"]["cpu_s"] - mem.marks[f"round-{r - 1}"]["cpu_s"] for r in range(1, rounds + 1)]
    return {
        "setup_s": marks[0] - t_call,
        "first_round_s": per[0],
        "steady_round_s": statistics.fmean(_steady(per)),
        "steady_cpu_s": statistics.fmean(_steady(cpu)),  # CPU seconds of the whole process tree per round
        "last_round_s": per[-1],
        "round_s": per,
        "round_cpu_s": cpu,
    }


def _marker(marks: dict[int, float], rows: list[dict], mem: TreeMemory):
    def progress(r: int, row: dict) -> None:
        marks[r] = time.perf_counter()
        mem.mark(f"round-{r}")
        rows.append(dict(row))

    return progress


def _measure_plain(cfg, threads: int, mem: TreeMemory) -> dict[str, Any]:
    from fl_sim.bench.plain_loop import plain_fedavg

    marks: dict[int, float] = {}
    rows: list[dict] = []
    t_call = time.perf_counter()
    plain_fedavg(cfg, threads=threads, progress=_marker(marks, rows, mem))
    out = _round_times(marks, t_call, cfg.rounds, mem)
    out["total_s"] = time.perf_counter() - t_call
    out["final_test_loss"] = rows[-1]["test_loss"]
    out["final_test_accuracy"] = rows[-1]["test_accuracy"]
    return out


def _measure_fl_sim(cfg, mem: TreeMemory) -> dict[str, Any]:
    from fl_sim.runs.simulation import run_experiment

    marks: dict[int, float] = {}
    rows: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix="bench-round-"))
    t_call = time.perf_counter()
    try:
        run_experiment(cfg, run_dir, _marker(marks, rows, mem))
        t_end = time.perf_counter()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    out = _round_times(marks, t_call, cfg.rounds, mem)
    out["teardown_s"] = t_end - marks[cfg.rounds]
    out["total_s"] = t_end - t_call
    out["final_test_loss"] = rows[-1]["test_loss"]
    out["final_test_accuracy"] = rows[-1]["test_accuracy"]
    out["round_s"] = [r.get("round_s") for r in rows[1:]]
    return out


def _timed_inline(cfg, mem: TreeMemory) -> dict[str, Any]:
    """The inline run with timers around our functions; per-round totals over rounds 2..R."""
    from flwr.clientapp import ClientApp

    import fl_sim.runs.build as fb
    import fl_sim.clients.app as capp
    import fl_sim.clients.runtime as crt
    import fl_sim.data as fdata
    import fl_sim.strategies.base as sb
    import fl_sim.engine.inline as ft

    acc: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    on = {"count": False}

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                if on["count"]:
                    acc[label] += time.perf_counter() - t0
                    calls[label] += 1

        setattr(owner, name, timed)

    wrap(capp, "runtime_for", "runtime_for")
    wrap(crt.ClientRuntime, "load_model", "load_model")
    wrap(fdata.FederatedData, "client_data", "client_data")
    wrap(capp, "train_local", "train_local")
    wrap(capp, "state_dict_to_arrays", "state_dict_to_arrays")
    wrap(ClientApp, "__call__", "clientapp_call")
    wrap(sb.UpdateStrategy, "configure_train", "configure_train")
    wrap(sb.UpdateStrategy, "collect", "collect")
    wrap(sb.UpdateStrategy, "aggregate_train", "aggregate_train")
    wrap(fb.Experiment, "evaluate", "evaluate")
    wrap(ft.InMemoryGrid, "send_and_receive", "send_and_receive")
    marks: dict[int, float] = {}

    def progress(r: int, row: dict) -> None:
        marks[r] = time.perf_counter()
        mem.mark(f"round-{r}")
        on["count"] = r >= 1  # round 1 builds the client runtime: leave it out

    from fl_sim.runs.simulation import run_experiment

    run_dir = Path(tempfile.mkdtemp(prefix="bench-round-"))
    try:
        run_experiment(cfg, run_dir, progress)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    n_rounds = cfg.rounds - 1
    k = cfg.sampled_per_round()
    wall = (marks[cfg.rounds] - marks[1]) / n_rounds
    per_round = {key: v / n_rounds for key, v in acc.items()}
    g = per_round.get
    client_ours = g("runtime_for", 0) + g("load_model", 0) + g("client_data", 0)
    inside = client_ours + g("train_local", 0) + g("state_dict_to_arrays", 0)
    breakdown = {
        "local training (train_local)": g("train_local", 0),
        "client: config lookup (runtime_for)": g("runtime_for", 0),
        "client: load global model (load_model)": g("load_model", 0),
        "client: slice data (client_data)": g("client_data", 0),
        "client: model -> ArrayRecord (state_dict_to_arrays)": g("state_dict_to_arrays", 0),
        "client: rest of ClientApp call (Flower dispatch, mod, Message/Record objects)": g("clientapp_call", 0) - inside,
        "server: configure_train (sampling, messages)": g("configure_train", 0),
        "server: read replies (collect: flatten, checks, bits)": g("collect", 0),
        "server: combine + server step + new ArrayRecord": g("aggregate_train", 0) - g("collect", 0),
        "server: evaluation (round R only)": g("evaluate", 0),
        "rest (Flower's strategy loop, grid loop, run records)": wall - g("send_and_receive", 0) - g("configure_train", 0)
        - g("aggregate_train", 0) - g("evaluate", 0) + (g("send_and_receive", 0) - g("clientapp_call", 0)),
    }
    cpu = (mem.marks[f"round-{cfg.rounds}"]["cpu_s"] - mem.marks["round-1"]["cpu_s"]) / n_rounds
    return {"round_s": wall, "round_cpu_s": cpu, "clients": k, "breakdown_s": breakdown,
            "per_client_ms": {key: 1e3 * v / k for key, v in breakdown.items()}}


def apply_proposed_fixes() -> list[str]:
    """Monkeypatch, in this process only, the changes proposed in docs/performance.md (what-if runs).

    1. the client runtime's cache key (a YAML dump of the whole config, per message) is computed
       once per config object; 2. ``array_bits`` reads sizes from the records' metadata instead of
       deserializing every array; 3. one FederatedData per (data config, clients, seed) and process,
       so an inline run does not load its dataset twice (server and client runtime).
    Ray actors are other processes and are not patched: these numbers are for ``inline``.
    """
    import math

    import numpy as np

    import fl_sim.runs.build as fb
    import fl_sim.clients.app as capp
    import fl_sim.clients.runtime as crt
    import fl_sim.strategies.base as sb

    orig_runtime_for = capp.runtime_for
    by_id: dict[int, tuple[Any, Any]] = {}

    def runtime_for(cfg):
        hit = by_id.get(id(cfg))
        if hit is not None and hit[0] is cfg:
            return hit[1]
        rt = orig_runtime_for(cfg)
        by_id[id(cfg)] = (cfg, rt)
        return rt

    def array_bits(arrays) -> int:
        return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize * 8 for a in arrays.values()))

    orig_load = fb.load_federated
    loaded: dict[tuple, Any] = {}

    def load_federated(cfg, num_clients, seed):
        key = (repr(cfg), int(num_clients), int(seed))
        if key not in loaded:
            loaded[key] = orig_load(cfg, num_clients, seed)
        return loaded[key]

    capp.runtime_for = runtime_for
    sb.array_bits = array_bits
    fb.load_federated = load_federated
    crt.load_federated = load_federated
    return ["runtime key once per config", "array_bits from metadata", "one dataset per process"]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: spec = {workload, per_round, rounds, mode, num_cpus, threads}."""
    logging.disable(logging.INFO)
    if spec.get("what_if"):
        apply_proposed_fixes()
    mode = spec["mode"]
    backend = ("ray" if mode.startswith("ray") else "vectorized" if mode.startswith("vectorized")
               else "auto" if mode == "auto" else "inline")
    cfg = workload_config(spec["workload"], spec["per_round"], spec["rounds"], backend, spec.get("num_cpus", 1.0))
    if mode == "vectorized-1t":  # the batched calls on one torch thread (simulation.cohort_threads=1)
        cfg.simulation.cohort_threads = 1
    if mode == "vectorized-nt":  # one thread per core always (the default before the automatic rule)
        from fl_sim.engine.vectorized import cpu_cores

        cfg.simulation.cohort_threads = cpu_cores()
    with TreeMemory(0.25) as mem:
        if mode == "plain":
            out = _measure_plain(cfg, spec.get("threads", 1), mem)
        elif mode in ("inline", "ray", "auto", "vectorized", "vectorized-1t", "vectorized-nt"):
            out = _measure_fl_sim(cfg, mem)
        elif mode == "timed-inline":
            out = _timed_inline(cfg, mem)
        elif mode == "ray-instrumented":
            from fl_sim.bench.bench_scale import instrumented_run

            out = instrumented_run(cfg, mem=mem, ray_init=spec.get("ray_init"))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    out["memory_peak"] = mem.summary()
    out["spec"] = spec
    out["loadavg"] = os.getloadavg()
    return out


# ============================================================================ orchestration
def _label(res: dict[str, Any]) -> str:
    s = res["spec"]
    m = s["mode"]
    if m.startswith("ray"):
        m += f"@{s.get('num_cpus', 1.0):g}cpu"
    if s.get("what_if"):
        m += "+fix"
    if s.get("ray_init"):
        m += "+" + ",".join(f"{k}={v}" for k, v in s["ray_init"].items())
    return m


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes (a Python spin loop each) beside the measurement: the contention mode."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # only the processes started by busy_processes, by their own id
        proc.kill()
        proc.wait()


def busy_count(per_cores: int) -> int:
    """One busy process per ``per_cores`` cores (at least one)."""
    from fl_sim.engine.vectorized import cpu_cores

    return max(1, -(-cpu_cores() // per_cores))


def measure_point(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a child process, with ``spec["busy"]`` CPU-bound processes running beside it."""
    procs = busy_processes(spec.get("busy", 0))
    try:
        if procs:
            time.sleep(0.5)  # let the spinners take their cores before the run starts
        return run_point_cmd("fl_sim.bench.bench_round", spec, timeout)
    finally:
        stop_busy(procs)


def run(workloads: list[str], per_round: list[int], modes: list[str], *, rounds: int = 0, repeats: int = 2,
        num_cpus: list[float] | None = None, profile: bool = False, timeout: float = 400.0,
        what_if: bool = False, tune: bool = False, scale: bool = False, contention: list[int] | None = None,
        log=print) -> dict[str, Any]:
    """All measurements; returns {"machine", "runs": [...], "profile": [...]}. ``contention``: the numbers
    of CPU-bound processes to run beside each measurement (0 = none), alternated like the modes."""
    num_cpus = num_cpus or [1.0]
    contention = contention or [0]
    if "lenet" in workloads:
        lenet_root()  # fabricate once, before the children race for it
    runs: list[dict[str, Any]] = []
    for rep in range(repeats):
        for w in workloads:
            r = rounds or DEFAULT_ROUNDS[w]
            for k in per_round:
                order = modes if rep % 2 == 0 else list(reversed(modes))  # alternate who goes first
                busy_order = contention if rep % 2 == 0 else list(reversed(contention))
                for mode in order:
                    for busy in busy_order:  # idle and busy side by side for each mode: the same load drift
                        for c in (num_cpus if mode == "ray" else [1.0]):
                            spec = {"workload": w, "per_round": k, "rounds": r, "mode": mode, "num_cpus": c,
                                    "repeat": rep, "busy": busy}
                            res = measure_point(spec, timeout)
                            runs.append(res)
                            log(_line(res))
                        if what_if and mode == "inline":
                            res = run_point_cmd("fl_sim.bench.bench_round", {**spec, "what_if": True}, timeout)
                            runs.append(res)
                            log(_line(res))
    prof: list[dict[str, Any]] = []
    if profile:
        k = max(per_round)
        for w in workloads:
            r = rounds or DEFAULT_ROUNDS[w]
            variants = [("timed-inline", False), ("ray-instrumented", False)]
            if what_if:
                variants.insert(1, ("timed-inline", True))
            for mode, fix in variants:
                spec = {"workload": w, "per_round": k, "rounds": r, "mode": mode, "num_cpus": num_cpus[0],
                        "what_if": fix}
                res = run_point_cmd("fl_sim.bench.bench_round", spec, timeout)
                prof.append(res)
                log(_profile_lines(res))
    if tune:  # what Flower exposes: CPUs per actor, i.e. actors on 2 cores (Flower 1.41 already starts Ray
        # without the dashboard: RayBackend.init_ray does init_args.setdefault("include_dashboard", False))
        k = max(per_round)
        for w in workloads:
            r = rounds or DEFAULT_ROUNDS[w]
            for c, init in ((0.5, None), (1.0, None), (2.0, None)):
                spec = {"workload": w, "per_round": k, "rounds": r, "mode": "ray-instrumented", "num_cpus": c,
                        "ray_init": init}
                res = run_point_cmd("fl_sim.bench.bench_round", spec, timeout)
                prof.append(res)
                log(_profile_lines(res))
    scale_runs: list[dict[str, Any]] = []
    if scale:
        spec = {"workload": "scale", "per_round": int(SCALE["clients"] * SCALE["clients_per_round"]),
                "rounds": SCALE["rounds"], "mode": "vectorized"}
        res = run_point_cmd("fl_sim.bench.bench_round", spec, max(timeout, 1800.0))
        scale_runs.append(res)
        log(_line(res) + (f"  total {res['total_s']:.1f} s" if "total_s" in res else ""))
    return {"machine": machine(), "runs": runs, "profile": prof, "scale": scale_runs, "summary": summarize(runs)}


def _line(res: dict[str, Any]) -> str:
    s = res["spec"]
    head = f"{s['workload']:>10} k={s['per_round']:<4} {_label(res):<14} busy {s.get('busy', 0)} rep {s.get('repeat', 0)}"
    if "error" in res:
        return f"{head}: {res['error']}"
    pk = res["memory_peak"]
    return (f"{head} setup {res['setup_s']:5.1f} s  round1 {res['first_round_s']:6.2f} s  "
            f"steady {res['steady_round_s']:6.3f} s/round ({res['steady_cpu_s']:6.3f} CPU s)  loss {res['final_test_loss']:.6f}  "
            f"peak RSS {pk['peak_rss_gib']:.2f} PSS {pk['peak_pss_gib']:.2f} GiB  load {res['loadavg'][0]:.1f}")


def _profile_lines(res: dict[str, Any]) -> str:
    s = res["spec"]
    if "error" in res:
        return f"profile {s['workload']} {s['mode']}: {res['error']}"
    if s["mode"] == "timed-inline":
        lines = [f"profile {s['workload']} k={s['per_round']} {_label(res)}: {res['round_s']:.3f} s/round "
                 f"({res['round_cpu_s']:.3f} CPU s; rounds 2..R, evaluation of round R included)"]
        for key, v in res["breakdown_s"].items():
            lines.append(f"    {key:<80} {v:7.3f} s  {res['per_client_ms'][key]:7.2f} ms/client")
        return "\n".join(lines)
    rr = res["rounds"][1:] or res["rounds"]
    mean = lambda key: statistics.fmean(r[key] for r in rr)  # noqa: E731
    k = rr[0]["replies"]
    pk = res["memory_peak"]
    return (f"profile {s['workload']} k={s['per_round']} {_label(res)}: {mean('round_s'):.3f} s/round "
            f"({mean('tree_cpu_s'):.3f} CPU s of the process tree), messages out {mean('send_receive_s'):.3f} s, "
            f"ClientApp {mean('app_mean_ms'):.1f} ms/client ({1e3 * mean('app_cpu_sum_s') / k:.1f} ms CPU) on "
            f"{rr[0]['actors']} actors; CPU outside the ClientApps "
            f"{1e3 * (mean('tree_cpu_s') - mean('app_cpu_sum_s')) / k:.1f} ms/client (server, Flower, Ray); "
            f"wall transport estimate {mean('transport_ms_per_client'):.1f} ms/client; start: "
            f"{res['start_to_first_round_s']:.1f} s + round 1 {res['first_round_s']:.1f} s; "
            f"peak RSS {pk['peak_rss_gib']:.2f} PSS {pk['peak_pss_gib']:.2f} GiB")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, k, mode): median steady round time over repeats and its ratio to plain."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if "error" not in r:
            groups[(r["spec"]["workload"], r["spec"]["per_round"], r["spec"].get("busy", 0), _label(r))].append(r)
    rows = []
    for (w, k, busy, label), rs in sorted(groups.items()):
        plain = groups.get((w, k, busy, "plain"))
        inline = groups.get((w, k, busy, "inline"))
        base_inline = statistics.median(r["steady_round_s"] for r in inline) if inline else float("nan")
        steady = statistics.median(r["steady_round_s"] for r in rs)
        base = statistics.median(r["steady_round_s"] for r in plain) if plain else float("nan")
        cpu = statistics.median(r["steady_cpu_s"] for r in rs)
        base_cpu = statistics.median(r["steady_cpu_s"] for r in plain) if plain else float("nan")
        rows.append({
            "workload": w, "per_round": k, "busy": busy, "mode": label, "repeats": len(rs),
            "setup_s": statistics.median(r["setup_s"] for r in rs),
            "first_round_s": statistics.median(r["first_round_s"] for r in rs),
            "steady_round_s": steady, "steady_all": [round(r["steady_round_s"], 4) for r in rs],
            "ratio_to_plain": steady / base,
            "speedup_over_inline": base_inline / steady,  # inline's steady round time / this mode's
            "steady_cpu_s": cpu, "cpu_ratio_to_plain": cpu / base_cpu if base_cpu else float("nan"),
            "ms_per_client": 1e3 * steady / k,
            "peak_rss_gib": max(r["memory_peak"]["peak_rss_gib"] for r in rs),
            "peak_pss_gib": max(r["memory_peak"]["peak_pss_gib"] for r in rs),
            "final_test_loss": rs[0]["final_test_loss"],
            "loadavg": [round(r["loadavg"][0], 1) for r in rs],
        })
    return rows


def print_side_by_side(rows: list[dict[str, Any]], log=print) -> None:
    """Per workload, k and mode: steady s/round and the speed-up over inline, idle and busy columns."""
    busies = sorted({r["busy"] for r in rows})
    if len(busies) < 2:
        return
    cell = {(r["workload"], r["per_round"], r["mode"], r["busy"]): r for r in rows}
    head = "".join(f" {'s/round b' + str(b):>12} {'x inline':>8} {'load':>10}" for b in busies)
    log(f"{'workload':>10} {'k':>5} {'mode':<14}{head}")
    for w, k, m in sorted({(r["workload"], r["per_round"], r["mode"]) for r in rows}):
        line = f"{w:>10} {k:>5} {m:<14}"
        for b in busies:
            r = cell.get((w, k, m, b))
            line += (f" {r['steady_round_s']:12.4f} {r['speedup_over_inline']:8.2f} {str(r['loadavg']):>10}" if r
                     else f" {'-':>12} {'-':>8} {'':>10}")
        log(line)


def print_summary(rows: list[dict[str, Any]], log=print) -> None:
    log(f"{'workload':>10} {'k':>4} {'busy':>4} {'mode':<14} {'setup s':>8} {'round1 s':>9} {'steady s':>9} {'ms/client':>9} "
        f"{'x plain':>7} {'inline/':>7} {'CPU s':>7} {'x plain':>7} {'RSS GiB':>7} {'PSS GiB':>7}  final loss   load")
    for r in rows:
        log(f"{r['workload']:>10} {r['per_round']:>4} {r['busy']:>4} {r['mode']:<14} {r['setup_s']:8.2f} {r['first_round_s']:9.2f} "
            f"{r['steady_round_s']:9.3f} {r['ms_per_client']:9.2f} {r['ratio_to_plain']:7.2f} "
            f"{r['speedup_over_inline']:7.2f} "
            f"{r['steady_cpu_s']:7.3f} {r['cpu_ratio_to_plain']:7.2f} "
            f"{r['peak_rss_gib']:7.2f} {r['peak_pss_gib']:7.2f}  {r['final_test_loss']:.6f}  {r['loadavg']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench_round", description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="quickstart,lenet")
    p.add_argument("--per-round", default="10,100")
    p.add_argument("--modes", default="plain,inline,ray")
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (0: 6 quickstart, 4 lenet)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--num-cpus", default="1", help="simulation.num_cpus values for the ray mode, e.g. 0.5,1,2")
    p.add_argument("--profile", action="store_true", help="also the time breakdown (inline timers, Ray transport)")
    p.add_argument("--what-if", action="store_true",
                   help="also inline runs with the proposed fixes monkeypatched in (see apply_proposed_fixes)")
    p.add_argument("--tune", action="store_true",
                   help="also Ray with num_cpus 0.5/1/2 per actor (instrumented runs)")
    p.add_argument("--scale", action="store_true",
                   help="also 10,000 quickstart clients, 10%% a round, 50 rounds, vectorized (time and peak memory)")
    p.add_argument("--contention", default="off", choices=("off", "on", "both"),
                   help="CPU-bound processes beside each measurement: off, on (one per --busy-per-cores cores), or "
                        "both (each mode idle and busy, side by side)")
    p.add_argument("--busy-per-cores", type=int, default=2, help="contention: one busy process per this many cores")
    p.add_argument("--quick", action="store_true", help="quickstart only, 1 repeat")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for the test suite: quickstart, 2 a round, 3 rounds, plain and inline, 1 repeat")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per measurement")
    p.add_argument("--out", type=Path, default=Path("bench_out/round.json"))
    add_worker_options(p)
    a = p.parse_args(argv)
    if (res := serve_worker(a, measure)) is not None:
        return res
    if a.smoke:
        a.workloads, a.per_round, a.modes, a.rounds, a.repeats = "quickstart", "2", "plain,inline", 3, 1
    workloads = ["quickstart"] if a.quick else [w for w in a.workloads.split(",") if w]
    if a.busy_per_cores < 1:
        p.error("--busy-per-cores must be >= 1")
    nb = busy_count(a.busy_per_cores)
    data = run(workloads, [int(k) for k in a.per_round.split(",") if k], [m for m in a.modes.split(",") if m],
               rounds=a.rounds, repeats=1 if a.quick else a.repeats,
               num_cpus=[float(c) for c in a.num_cpus.split(",") if c], profile=a.profile, timeout=a.timeout,
               what_if=a.what_if, tune=a.tune, scale=a.scale,
               contention={"off": [0], "on": [nb], "both": [0, nb]}[a.contention],
               log=lambda s: print(s, flush=True))
    print()
    print_summary(data["summary"])
    print()
    print_side_by_side(data["summary"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(a.out)
    print(f"wrote {a.out}  (machine: {data['machine']['cpu']}, {data['machine']['cores']} cores, "
          f"load {data['machine']['loadavg']})", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
