"""Where the CPU of a Ray round goes, per process and per thread.

Runs one workload of bench_round (default ``lenet``: LeNet-5, 100 clients per round) on Flower's Ray
backend, instrumented as ``bench_round --profile`` (bench_scale.instrumented_run: an outer client mod
reports each ClientApp call's own CPU time), and at the end of every round reads, from /proc, the CPU
seconds (user + system) of every process of the tree and of every thread in it. Per round it
reports the CPU per process role (driver: the ServerApp, Flower's SuperLink state and its polling
threads, Ray's core worker; ``ClientAppActor``: the Ray actors; raylet, GCS, other Ray agents),
per thread name inside the driver and the actors, and the actors' CPU outside the ClientApp call.

``--env FL_SIM_BASELINE=1`` runs fl-sim as before docs/perf/ray_profile.md (Flower's own message
poll, the ClientApp pickled by value, the driver on torch's default thread count). ``--py-spy SECONDS`` also records one actor with py-spy (``--idle``, raw collapsed stacks) for
that long from the start of round 2 and prints the heaviest stacks; ``--env K=V,...`` sets
environment variables before Ray starts (the actors inherit them), for A/B runs.

Usage: ``fl-sim bench ray-profile`` or ``python -m fl_sim.bench.ray_profile [--workload lenet]
[--per-round 100] [--rounds 4] [--env OMP_NUM_THREADS=1] [--py-spy 6] [--out bench_out/ray_profile.json]``.
``--smoke`` (the test suite) runs only the poll micro-benchmark at 10 nodes x 10 messages: the profile
itself needs a Ray cluster (seconds to start, a process per actor), which the suite does not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from fl_sim.bench.bench_codecs import write_json
from fl_sim.bench.bench_scale import (TreeMemory, _proc_table, add_worker_options, parse_stat, run_point_cmd,
                                     serve_worker, tree_pids)


def role(pid: int, driver: int) -> str:
    if pid == driver:
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for key, name in (("ClientAppActor", "actor"), ("raylet", "raylet"), ("gcs_server", "gcs_server"),
                      ("ray::IDLE", "idle worker"), ("dashboard", "dashboard agent"),
                      ("runtime_env", "runtime_env agent"), ("log_monitor", "log_monitor"),
                      ("monitor.py", "monitor")):
        if key in cmd:
            return name
    return cmd.split()[0].rsplit("/", 1)[-1][:30] if cmd.strip() else "?"


def _py_thread_names() -> dict[int, str]:
    """This process's Python threads: native id -> name without its counter ("Thread-3 (f)" -> "f")."""
    import re
    import threading

    out = {}
    for t in threading.enumerate():
        if t.native_id is not None:
            out[t.native_id] = re.sub(r"^Thread-\d+ \((.*)\)$", r"\1", re.sub(r"_\d+$", "", t.name))
    return out


def snapshot(driver: int) -> dict[int, dict[str, Any]]:
    """Per process of the tree: its role, CPU seconds, {thread name: CPU seconds} (the driver's Python
    threads by their Python name) and the number of threads that have used CPU."""
    out: dict[int, dict[str, Any]] = {}
    py_names = _py_thread_names() if driver == os.getpid() else {}
    for pid in tree_pids(driver, _proc_table()):
        try:
            _, _, cpu = parse_stat(f"/proc/{pid}/stat")
            threads: Counter = Counter()
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    comm, _, tcpu = parse_stat(f"/proc/{pid}/task/{tid}/stat")
                except OSError:
                    continue
                if pid == driver:
                    comm = py_names.get(int(tid), comm)
                elif int(tid) != pid:
                    comm = f"{comm} (thread)" if comm.startswith("ray::") else comm  # not the main thread
                threads[comm] += tcpu
            out[pid] = {"role": role(pid, driver), "cpu_s": cpu, "threads": dict(threads)}
        except OSError:
            continue
    return out


class ProcCPU(TreeMemory):
    """TreeMemory whose marks also keep a per-process, per-thread CPU snapshot; can start py-spy."""

    def __init__(self, *a, py_spy_s: float = 0.0, py_spy_out: str | None = None, py_spy_target: str = "actor",
                 **kw) -> None:
        super().__init__(*a, **kw)
        self.py_spy_target = py_spy_target
        self.snaps: dict[str, dict[int, dict[str, Any]]] = {}
        self.py_spy_s = py_spy_s
        self.py_spy_out = py_spy_out
        self.py_spy: subprocess.Popen | None = None
        self.py_spy_pid: int | None = None

    def mark(self, label: str) -> dict[str, float]:
        snap = snapshot(self.root)
        self.snaps[label] = snap
        if label == "round-1" and self.py_spy_s > 0:
            actors = [p for p, s in snap.items() if s["role"] == self.py_spy_target]
            if actors:
                self.py_spy_pid = actors[0]
                native = ["--native"] if self.py_spy_target == "driver" else []  # its unnamed C++/OpenMP threads
                self.py_spy = subprocess.Popen(
                    ["py-spy", "record", "--idle", "--threads", "-r", "100", "-d", str(int(self.py_spy_s)),
                     "-f", "raw", "-o", self.py_spy_out, "--pid", str(actors[0]), *native, *([] if native else ["--nonblocking"])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return super().mark(label)


def _deltas(a: dict[int, dict], b: dict[int, dict]) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[int, float]]:
    """CPU used between snapshots a and b: per role, per role's thread names, per actor pid."""
    by_role: dict[str, float] = defaultdict(float)
    threads: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_actor: dict[int, float] = {}
    for pid, s in b.items():
        p0 = a.get(pid, {"cpu_s": 0.0, "threads": {}})
        d = s["cpu_s"] - p0["cpu_s"]
        by_role[s["role"]] += d
        if s["role"] == "actor":
            per_actor[pid] = d
        for name, c in s["threads"].items():
            threads[s["role"]][name] += c - p0["threads"].get(name, 0.0)
    return dict(by_role), {r: dict(t) for r, t in threads.items()}, per_actor


def _collapse(path: str, top: int = 25) -> dict[str, Any]:
    """py-spy raw output -> share of samples per thread, per leaf-ish frame and per whole stack."""
    stacks: Counter = Counter()
    try:
        for line in Path(path).read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            stacks[stack] += int(n)
    except (OSError, ValueError):
        return {}
    total = sum(stacks.values()) or 1
    by_thread: Counter = Counter()
    by_frame: Counter = Counter()  # inclusive: every frame a sample passes through (once per sample)
    for stack, n in stacks.items():
        frames = stack.split(";")
        by_thread[frames[0]] += n
        for f in set(frames[1:]):
            by_frame[f] += n
    return {
        "samples": total,
        "threads": {k: v / total for k, v in by_thread.most_common(12)},
        "inclusive_frames": {k: v / total for k, v in by_frame.most_common(top)},
        "top_stacks": [(v / total, k.split(";")[-6:]) for k, v in stacks.most_common(12)],
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    from fl_sim.bench.bench_round import workload_config
    from fl_sim.bench.bench_scale import instrumented_run

    logging.disable(logging.INFO)
    env = dict(spec.get("env") or {})
    if env.pop("FL_SIM_BASELINE", "0") == "1":  # before this work: Flower's poll, the ClientApp pickled by value
        from flwr.clientapp import ClientApp

        from fl_sim.clients.app import FlSimClientApp

        import fl_sim.runs.simulation as fsim

        env["FL_SIM_FLOWER_POLL"] = "flower"
        FlSimClientApp.__reduce__ = ClientApp.__reduce__
        fsim.serial_torch_in_driver = lambda: None
    for k, v in env.items():
        os.environ[k] = str(v)
    cfg = workload_config(spec["workload"], spec["per_round"], spec["rounds"], "ray", spec.get("num_cpus", 1.0))
    spy_out = spec.get("py_spy_out") or "/tmp/fl-sim-ray-profile.pyspy.txt"
    with ProcCPU(0.25, py_spy_s=spec.get("py_spy_s", 0.0), py_spy_out=spy_out,
                 py_spy_target=spec.get("py_spy_target", "actor")) as mem:
        res = instrumented_run(cfg, mem=mem)
    rounds = []
    for r in range(1, cfg.rounds + 1):
        by_role, threads, per_actor = _deltas(mem.snaps[f"round-{r - 1}"], mem.snaps[f"round-{r}"])
        rr = res["rounds"][r - 1]
        rounds.append({"round": r, "round_s": rr["round_s"], "replies": rr["replies"], "app_cpu_s": rr["app_cpu_sum_s"],
                       "by_role": by_role, "threads": threads, "per_actor": per_actor})
    out = {"spec": spec, "final_test_loss": res["final_test_loss"], "rounds": rounds, "loadavg": os.getloadavg(),
           "sampler_cpu_s": mem.sampler_cpu_s}
    if mem.py_spy is not None:
        mem.py_spy.wait(timeout=60)
        out["py_spy"] = {"pid": mem.py_spy_pid, "seconds": mem.py_spy_s, **_collapse(spy_out)}
    return out


def report(res: dict[str, Any], log=print) -> None:
    if "error" in res:
        log(f"error: {res['error']}")
        return
    steady = res["rounds"][1:-1] or res["rounds"][1:]  # rounds 2..R-1: no start-up, no final evaluation
    k = steady[0]["replies"]
    roles = sorted({r for x in steady for r in x["by_role"]}, key=lambda r: -statistics.fmean(x["by_role"].get(r, 0) for x in steady))
    m = lambda f: statistics.fmean(f(x) for x in steady)  # noqa: E731
    tot = m(lambda x: sum(x["by_role"].values()))
    log(f"{res['spec']}  loss {res['final_test_loss']:.6f}  load {res['loadavg'][0]:.1f}  rounds {[x['round'] for x in steady]}"
        f"  {m(lambda x: x['round_s']):.3f} s/round")
    log(f"  {'process':<22} {'CPU s/round':>11} {'ms/client':>10}")
    for r in roles:
        v = m(lambda x: x["by_role"].get(r, 0.0))
        log(f"  {r:<22} {v:11.3f} {1e3 * v / k:10.2f}")
    app = m(lambda x: x["app_cpu_s"])
    act = m(lambda x: x["by_role"].get("actor", 0.0))
    log(f"  {'total':<22} {tot:11.3f} {1e3 * tot / k:10.2f}")
    log(f"  {'  in ClientApp calls':<22} {app:11.3f} {1e3 * app / k:10.2f}")
    log(f"  {'  actors outside them':<22} {act - app:11.3f} {1e3 * (act - app) / k:10.2f}")
    log(f"  {'  all outside them':<22} {tot - app:11.3f} {1e3 * (tot - app) / k:10.2f}")
    for r in ("driver", "actor"):
        names = Counter()
        for x in steady:
            for n, c in x["threads"].get(r, {}).items():
                names[n] += c / len(steady)
        log(f"  threads of {r}: " + ", ".join(f"{n} {1e3 * c / k:.2f}" for n, c in names.most_common(10) if c > 0.0005)
            + " (ms/client)")
    if "py_spy" in res:
        p = res["py_spy"]
        log(f"  py-spy on {res['spec'].get('py_spy_target', 'actor')} {p.get('pid')} ({p.get('samples')} samples, --idle):")
        for n, s in p.get("threads", {}).items():
            log(f"    thread {s:6.1%}  {n}")
        for n, s in list(p.get("inclusive_frames", {}).items())[:25]:
            log(f"    incl {s:6.1%}  {n[:150]}")


def toy_link_state(nodes: int, messages: int):
    """Flower's in-memory LinkState set up as run_simulation does, ``nodes`` registered SuperNodes and
    ``messages`` train messages pushed round-robin through its InMemoryGrid: (state, grid, node ids)."""
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    ids = list(_register_nodes(nodes, factory))
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    grid.push_messages([Message(RecordDict(), dst_node_id=ids[i % len(ids)], message_type="train")
                        for i in range(messages)])
    return state, grid, ids


def poll_micro(nodes: int = 100, messages: int = 100, passes: int = 20) -> dict[str, float]:
    """CPU seconds of one pass of Flower's message extractor (vce_api.add_messages_to_queue: one
    ``get_message_ins(node, limit=1)`` per node), ``messages`` delivered messages in the store (a
    round in progress), with Flower's method and with fl_sim.engine.flower_poll's: {"flower": s, "fl-sim": s}."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    from fl_sim.engine import flower_poll

    state, _grid, ids = toy_link_state(nodes, messages)
    out = {}
    for name, fn in (("flower", InMemoryLinkState.__dict__["get_message_ins"]), ("fl-sim", flower_poll._get_message_ins)):
        got = sum(len(fn(state, node_id=n, limit=1)) for n in ids)  # delivers one per node
        passes_here = passes if nodes * messages <= 20_000 or name == "fl-sim" else 2
        t0 = time.process_time()
        for _ in range(passes_here):
            got += sum(len(fn(state, node_id=n, limit=1)) for n in ids)
        out[name] = (time.process_time() - t0) / passes_here
        for m in state.message_ins_store.values():  # undeliver for the next method
            m.metadata.delivered_at = ""
        out[name + " returned"] = got
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="ray_profile", description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="lenet")
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--env", action="append", default=[],
                   help="K=V,... environment for one run; repeat --env for an A/B (runs alternate, --repeats each)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--py-spy", type=float, default=0.0, help="seconds of py-spy on one actor from round 2")
    p.add_argument("--py-spy-target", default="actor", choices=["actor", "driver", "raylet"])
    p.add_argument("--poll-micro", default=None, metavar="NODESxMESSAGES,...",
                   help="only time one pass of Flower's message extractor, e.g. 100x100,1000x100")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="the test suite's run: --poll-micro 10x10 only (the Ray profile needs a Ray cluster)")
    add_worker_options(p)
    a = p.parse_args(argv)
    if (res := serve_worker(a, measure)) is not None:
        return [res]
    if a.smoke:
        print("smoke: the poll micro-benchmark only; the Ray profile is skipped (it starts a Ray cluster)")
        a.poll_micro = "10x10"
    if a.poll_micro:
        rows = []
        for spec in a.poll_micro.split(","):
            n, k = (int(v) for v in spec.split("x"))
            r = poll_micro(n, k)
            rows.append({"nodes": n, "messages": k, **r})
            print(f"{n:>7} nodes {k:>5} messages: Flower {1e3 * r['flower']:9.2f} ms/pass, fl-sim {1e3 * r['fl-sim']:8.3f} "
                  f"ms/pass ({r['flower'] / max(r['fl-sim'], 1e-9):.0f}x); returned {r['flower returned']}/{r['fl-sim returned']}",
                  flush=True)
        if a.out:
            write_json(rows, a.out)
        return rows
    envs = [dict(kv.split("=", 1) for kv in e.split(",") if kv) for e in (a.env or [""])]
    results = []
    for rep in range(a.repeats):
        for env in (envs if rep % 2 == 0 else envs[::-1]):
            spec = {"workload": a.workload, "per_round": a.per_round, "rounds": a.rounds, "num_cpus": a.num_cpus,
                    "env": env, "py_spy_s": a.py_spy, "py_spy_target": a.py_spy_target,
                    "repeat": rep}
            res = run_point_cmd("fl_sim.bench.ray_profile", spec, a.timeout)
            results.append(res)
            report(res, log=lambda s: print(s, flush=True))
    if a.out:
        write_json(results, a.out)
    return results


if __name__ == "__main__":
    main()
