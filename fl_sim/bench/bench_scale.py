"""Scale benchmark: per-round time and memory of fl-sim with 100 ... 100,000 clients, and the 10k configs.

Three jobs (``fl-sim bench scale --help``; also ``python -m fl_sim.bench.bench_scale``):

* ``--clients 100,1000,10000,100000`` (the curve): a stateless method (FIHT-CS, server-side error
  feedback, clients hold nothing) on one fabricated MNIST-format dataset of 200,000 28x28 images,
  shards partition (2 shards per client), LeNet-5, 100 clients per round, one local step of
  batch 32; every population size in its own process. ``--nodes clients`` is what ``fl-sim run``
  does (one Flower SuperNode per client); ``--nodes per_round`` runs the same strategy and ClientApp
  on as many SuperNodes as clients per round (virtual clients are routed ``cid % nodes``).
* ``--config configs/scale_10k.yaml``: one config through the same instrumented run (``--fabricate
  cifar10`` writes a fake CIFAR-10 of the real size to a temporary ``data.root`` first).
* ``--plot-only``: redraw ``--plot`` from ``--out``.
* ``--smoke``: the curve at tiny sizes for the test suite (4 clients, 2 a round, 2 rounds, inline,
  2,000 fabricated images under ``--data-root``); its figures mean nothing.

Measured per run (in a child process whose whole process tree is sampled, Ray workers included):
setup (data + partition + model in the driver), Ray start-up (until the first round's messages go
out), the first round (actors start and build their data), per-round time and its split (the
ClientApp's own time, summed over clients, against the time the round's messages were out), and the
process tree's RSS and PSS at the end of every round and at its peak.

Memory: see :class:`TreeMemory` (RSS over-counts shared pages, PSS does not).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["TreeMemory", "tree_pids", "tree_memory", "instrumented_run", "scale_config", "run_point", "run_point_cmd", "add_worker_options", "serve_worker", "main"]

# ============================================================================ process-tree memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_stat(path: str | Path) -> tuple[str, int, float]:
    """(comm, parent pid, CPU seconds used so far: user + system) from a /proc/<pid>[/task/<tid>]/stat file."""
    stat = Path(path).read_bytes().decode(errors="replace")
    # "pid (comm) state ppid ... utime stime ...": comm may contain spaces and parentheses
    lp, rp = stat.find("("), stat.rfind(")")
    rest = stat[rp + 2 :].split()
    return stat[lp + 1 : rp], int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far: user + system) of every process (/proc/<pid>/stat)."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            _, ppid, cpu = parse_stat(Path(entry.path, "stat"))
            out[int(entry.name)] = (ppid, cpu)
        except (OSError, ValueError, IndexError):  # the process ended mid-read
            continue
    return out


def tree_pids(root: int | None = None, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``root`` (default: this process) and all its descendants."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in (table if table is not None else _proc_table()).items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_pss(pid: int, with_pss: bool) -> tuple[int, int]:
    """(RSS, PSS) in bytes of one process; (0, 0) if it is gone. PSS = RSS when not asked for."""
    if with_pss:
        try:
            rss = pss = 0
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
            return rss, pss
        except (OSError, ValueError, IndexError):
            pass
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    return rss, rss


def _name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    return cmd[:80]


def tree_memory(root: int | None = None, with_pss: bool = True) -> tuple[int, int, list[tuple[int, int]], float]:
    """(sum RSS, sum PSS, [(pid, rss)], CPU seconds used by the live processes) of the tree of ``root`` now."""
    table = _proc_table()
    pids = tree_pids(root, table)
    per = [(pid, *_rss_pss(pid, with_pss)) for pid in pids]
    cpu = sum(table[p][1] for p in pids if p in table)
    return sum(p[1] for p in per), sum(p[2] for p in per), [(p[0], p[1]) for p in per], cpu


class TreeMemory:
    """Sample the memory of a process tree in a daemon thread (Linux /proc).

    Two sums over the tree (``root``, default this process, and all its descendants: Ray's raylet,
    GCS, dashboard and worker processes are children or grandchildren of the driver), in bytes:

    * RSS: resident set of every process, added up. Pages shared between processes (the torch and
      Ray libraries every worker maps, Ray's shared-memory object store) count once per process,
      so this over-counts: the conservative figure.
    * PSS: proportional set size (/proc/<pid>/smaps_rollup): a page shared by n processes counts 1/n
      in each, so the sum is the tree's real share of physical memory.

    RSS (/proc/<pid>/statm, cheap) is sampled every ``interval`` seconds; the process list is
    refreshed and PSS (the kernel walks every page table for it: ~10 ms per GB) read every
    ``pss_interval`` seconds and at every ``mark(label)``, which also records the CPU seconds (user +
    system) the tree's live processes have used: a measure of work that a loaded machine inflates
    less than wall time. ``sampler_cpu_s``: the sampler thread's own CPU time.
    """

    def __init__(self, interval: float = 0.2, *, pss_interval: float = 5.0, root: int | None = None) -> None:
        if interval <= 0 or pss_interval <= 0:
            raise ValueError(f"interval={interval}, pss_interval={pss_interval}: both must be > 0 seconds")
        self.interval = float(interval)
        self.pss_interval = float(pss_interval)
        self.root = os.getpid() if root is None else root
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.peak_top: list[tuple[str, int]] = []
        self.cpu_s = 0.0
        self.sampler_cpu_s = 0.0
        self.series: list[tuple[float, int, int]] = []  # (seconds since start, rss, last pss)
        self.marks: dict[str, dict[str, float]] = {}
        self._pids: list[int] = [self.root]
        self._pss = 0
        self._last_full = -1e9
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-memory", daemon=True)
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()

    def _full(self) -> None:
        """Refresh the process list, PSS and CPU seconds."""
        rss, pss, per, cpu = tree_memory(self.root, True)
        with self._lock:
            self._pids = [p for p, _ in per]
            self._pss, self.cpu_s = pss, cpu
            self.peak_pss = max(self.peak_pss, pss)
            self._last_full = time.perf_counter()
        self._record(rss, per)

    def _record(self, rss: int, per: list[tuple[int, int]]) -> None:
        with self._lock:
            self.series.append((time.perf_counter() - self._t0, rss, self._pss))
            if rss > self.peak_rss:
                self.peak_rss = rss
                self.peak_procs = len(per)
                self.peak_top = [(_name(pid), r) for pid, r in sorted(per, key=lambda p: -p[1])[:6]]

    def sample(self) -> tuple[int, int]:
        """One sample: RSS of the known processes; the full refresh when it is due. Returns (rss, pss)."""
        if time.perf_counter() - self._last_full >= self.pss_interval:
            self._full()
        else:
            per = [(pid, _rss_pss(pid, False)[0]) for pid in self._pids]
            self._record(sum(r for _, r in per), per)
        return self.series[-1][1], self.series[-1][2]

    def mark(self, label: str) -> dict[str, float]:
        """Record the tree's memory now (full refresh), the peaks so far and the CPU seconds under ``label``."""
        self._full()
        rss, pss = self.series[-1][1], self.series[-1][2]
        rec = {"t_s": time.perf_counter() - self._t0, "rss": rss, "pss": pss, "peak_rss": self.peak_rss,
               "peak_pss": self.peak_pss, "cpu_s": self.cpu_s}
        self.marks[label] = rec
        return rec

    def _loop(self) -> None:
        c0 = time.thread_time()
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a vanished process mid-read must not kill the sampler
                pass
            self.sampler_cpu_s = time.thread_time() - c0

    def __enter__(self) -> "TreeMemory":
        self._t0 = time.perf_counter()
        self._full()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._full()

    def summary(self) -> dict:
        gib = 1024**3
        return {
            "peak_rss_gib": self.peak_rss / gib,
            "peak_pss_gib": self.peak_pss / gib,
            "processes_at_peak": self.peak_procs,
            "top_at_peak": [(n, round(r / 1024**2)) for n, r in self.peak_top],
            "samples": len(self.series),
            "sampler_cpu_s": self.sampler_cpu_s,
        }


# ============================================================================ instrumented fl-sim run
def _timing_mod_factory():
    """A ClientApp mod that adds its own wall time and process id to the reply metrics.

    Made in a factory so that cloudpickle ships it by value to the Ray actors (no import needed there).
    """
    import os as _os
    import sys as _sys
    import time as _time

    def bench_timing_mod(message, context, call_next):
        t0, c0 = _time.perf_counter(), _time.process_time()
        reply = call_next(message, context)
        if not reply.has_error():
            metrics = reply.content.get("metrics")
            if metrics is not None:
                metrics["bench.app-s"] = _time.perf_counter() - t0
                metrics["bench.app-cpu-s"] = _time.process_time() - c0
                metrics["bench.pid"] = _os.getpid()
                rt = _sys.modules.get("fl_sim.clients.runtime")  # size of the process's runtime caches
                metrics["bench.rt-cache"] = sum(len(getattr(rt, n, ())) for n in ("_BY_ID", "_RECENT", "_CACHE"))
        return reply

    return bench_timing_mod


class TimedGrid:
    """A Grid proxy recording every send_and_receive: wall time and the replies' in-app times."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        t1 = time.perf_counter()
        app, app_cpu, pids, caches = [], [], set(), []
        for m in replies:
            if m.has_error():
                continue
            metrics = m.content.get("metrics")
            if metrics is not None and "bench.app-s" in metrics:
                app.append(float(metrics["bench.app-s"]))
                app_cpu.append(float(metrics["bench.app-cpu-s"]))
                pids.add(int(metrics["bench.pid"]))
                caches.append(int(metrics.get("bench.rt-cache", -1)))
        if msgs:
            self.calls.append({"t0": t0, "t1": t1, "messages": len(msgs), "replies": len(replies),
                               "app_s": app, "app_cpu_s": app_cpu, "pids": sorted(pids),
                               "runtime_cache_max": max(caches, default=-1)})
        return replies


def instrumented_run(cfg, *, nodes: int | None = None, mem: TreeMemory | None = None,
                     ray_init: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``cfg`` as ``fl-sim run`` does (same builders, server loop and Flower call), timing each part.

    ``nodes``: number of Flower SuperNodes (default ``cfg.clients``, as ``fl-sim run``). The ClientApp
    is ``make_client_app(cfg)`` with one extra outer mod that reports its own time. ``ray_init``: extra
    ``ray.init`` arguments (e.g. ``{"include_dashboard": False}``). Returns times (seconds), per-round
    rows and memory marks (bytes) when ``mem`` is given.
    """
    from flwr.serverapp import ServerApp

    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.clients.mods import compression_mod
    from fl_sim.engine.ray import quiet_flower, run_flower_simulation
    from fl_sim.runs.simulation import server_loop

    t_call = time.perf_counter()
    exp = build_experiment(cfg)
    t_built = time.perf_counter()
    n_nodes = int(nodes or cfg.clients)
    strategy = build_strategy(exp, min_available_nodes=n_nodes)
    app = make_client_app(cfg, mods=[_timing_mod_factory(), compression_mod])
    marks: dict[int, float] = {}
    rows: list[dict[str, Any]] = []
    memory: dict[int, dict[str, float]] = {}
    holder: dict[str, Any] = {}
    errors: list[BaseException] = []

    def progress(rnd: int, row: dict[str, Any]) -> None:
        marks[rnd] = time.perf_counter()
        rows.append(dict(row))
        if mem is not None:
            memory[rnd] = mem.mark(f"round-{rnd}")

    def serve(grid) -> None:
        holder["t_serve"] = time.perf_counter()
        holder["grid"] = tg = TimedGrid(grid)
        try:
            server_loop(tg, exp, strategy, None, progress)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    quiet_flower(cfg.simulation.log_level)
    if cfg.simulation.backend == "inline":
        from fl_sim.engine.inline import InMemoryGrid

        grid = InMemoryGrid(app, n_nodes)
        holder["t_grid"] = time.perf_counter()
        serve(grid)
    else:
        server_app = ServerApp()
        server_app.main()(lambda grid, context: serve(grid))
        run_flower_simulation(server_app, app, cfg, num_supernodes=n_nodes, ray_init=ray_init)
    t_end = time.perf_counter()
    if errors:
        raise errors[0]
    if len(rows) < cfg.rounds + 1:
        raise RuntimeError(f"the run stopped after {len(rows) - 1} of {cfg.rounds} rounds")
    calls = holder["grid"].calls
    per_round = []
    for r in range(1, cfg.rounds + 1):
        c = calls[r - 1]
        actors = max(1, len(c["pids"]))
        sr = c["t1"] - c["t0"]
        app_sum = float(sum(c["app_s"]))
        cpu = (memory[r]["cpu_s"] - memory[r - 1]["cpu_s"]) if r in memory and r - 1 in memory else float("nan")
        per_round.append({
            "round": r,
            "send_receive_s": sr,
            "outside_s": (marks[r] - marks[r - 1]) - sr,  # configure, aggregate, evaluation, records
            "app_sum_s": app_sum,
            "app_mean_ms": 1e3 * app_sum / max(1, len(c["app_s"])),
            "app_cpu_sum_s": float(sum(c["app_cpu_s"])),
            "tree_cpu_s": cpu,  # CPU seconds of the whole process tree in this round
            "runtime_cache_max": c["runtime_cache_max"],  # entries in a client process's runtime cache
            "actors": len(c["pids"]),
            "replies": c["replies"],
            # time the round's messages were out, times the workers, minus the ClientApps' own time:
            # what Flower's transport (Ray scheduling, serialization, polling, queues) cost per client
            "transport_ms_per_client": max(0.0, 1e3 * (sr * actors - app_sum) / max(1, c["replies"])),
            "round_s": float(rows[r].get("round_s", float("nan"))),
            "memory": memory.get(r, {}),
        })
    steady = [p["round_s"] for p in per_round[1:]] or [per_round[0]["round_s"]]
    steady_cpu = [p["tree_cpu_s"] for p in per_round[1:]] or [per_round[0]["tree_cpu_s"]]
    first_out = calls[0]["t0"]
    return {
        "backend": cfg.simulation.backend,
        "clients": cfg.clients,
        "per_round": cfg.sampled_per_round(),
        "nodes": n_nodes,
        "parameters": exp.dim,
        "setup_s": t_built - t_call,  # data + partition + model in the driver
        # Ray: start Ray, register the nodes, start the ServerApp, evaluate round 0, wait for the nodes
        "start_to_first_round_s": first_out - t_built,
        "first_round_s": per_round[0]["round_s"],
        "steady_round_s": sum(steady) / len(steady),
        "steady_cpu_s": sum(steady_cpu) / len(steady_cpu),
        "teardown_s": t_end - marks[cfg.rounds],
        "total_s": t_end - t_call,
        "rounds": per_round,
        "memory_round0": memory.get(0, {}),
        "final_test_loss": rows[-1].get("test_loss"),
        "final_test_accuracy": rows[-1].get("test_accuracy"),
    }


# ============================================================================ the scale curve
DEFAULT_CLIENTS = (100, 1_000, 10_000, 100_000)
CURVE_TRAIN_SAMPLES = 200_000  # 2 per client at 100,000 clients


def bench_root() -> Path:
    return Path(tempfile.gettempdir()) / "fl-sim-bench"


def scale_config(clients: int, *, per_round: int = 100, rounds: int = 4, root: str | Path,
                 backend: str = "ray", num_cpus: float = 1.0, method: str = "fiht_cs"):
    """The curve's config: LeNet-5 on shards of a fabricated MNIST, one local step, a stateless method."""
    from fl_sim.config import config_from_dict

    strategy: dict[str, Any] = {"name": method}
    if method == "fiht_cs":
        strategy["compression"] = 10
    elif method == "fetchsgd":
        strategy.update(rows=5, cols=1234, k=2769, momentum=0.9)  # d = 61,706: 10x fewer values, K/d = Tang's
    return config_from_dict({
        "name": f"scale-{clients}",
        "seed": 0,
        "rounds": rounds,
        "clients": clients,
        "clients_per_round": min(per_round, clients),
        "eval_every": 0,
        "data": {"name": "mnist", "root": str(root), "partition": "shards", "shards_per_client": 2},
        "model": {"name": "lenet5"},
        "train": {"local_steps": 1, "batch_size": 32, "lr": 0.05},
        "strategy": strategy,
        "simulation": {"backend": backend, "num_cpus": num_cpus},
    })


def _load_spec_config(spec: dict[str, Any]):
    from fl_sim.config import load_config

    if spec.get("config"):
        return load_config(spec["config"], list(spec.get("set", [])))
    return scale_config(spec["clients"], per_round=spec["per_round"], rounds=spec["rounds"], root=spec["root"],
                        backend=spec["backend"], num_cpus=spec["num_cpus"], method=spec["method"])


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    logging.disable(logging.INFO)
    cfg = _load_spec_config(spec)
    nodes = cfg.sampled_per_round() if spec.get("nodes") == "per_round" else cfg.clients
    with TreeMemory(0.2) as mem:
        out = instrumented_run(cfg, nodes=nodes, mem=mem, ray_init=spec.get("ray_init"))
    out["memory_peak"] = mem.summary()
    out["memory_series"] = [(round(t, 2), r, p) for t, r, p in mem.series[:: max(1, len(mem.series) // 400)]]
    out["spec"] = spec
    out["loadavg"] = os.getloadavg()
    out["env"] = {k: os.environ[k] for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    return out


def run_point(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one scale measurement in a child process (see :func:`run_point_cmd`)."""
    return run_point_cmd("fl_sim.bench.bench_scale", spec, timeout)


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--worker SPEC --result PATH`` options by which :func:`run_point_cmd` calls a module."""
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, measure_fn) -> dict[str, Any] | None:
    """The child side of :func:`run_point_cmd`: with ``--worker``, run ``measure_fn(spec)`` and write its
    result JSON to ``--result``; returns the result, or None when this is not a worker call."""
    if not args.worker:
        return None
    res = measure_fn(json.loads(args.worker))
    Path(args.result).write_text(json.dumps(res, default=float))
    return res


def run_point_cmd(module: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``python -m <module> --worker <spec>`` in a child process (own process tree, own memory peak).

    The child writes its result JSON to a temporary file; on ``timeout`` seconds its whole process
    tree (Ray's raylet and workers included) is killed and the result is an ``error`` entry.
    """
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec), "--result", result_path]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timer = threading.Timer(timeout, lambda: _kill_tree(proc.pid))
    timer.start()
    log_text, _ = proc.communicate()
    timer.cancel()
    wall = time.perf_counter() - t0
    try:
        out = json.loads(Path(result_path).read_text())
    except (OSError, ValueError):
        tail = "\n".join(log_text.strip().splitlines()[-8:])
        out = {"spec": spec, "error": f"exit code {proc.returncode} after {wall:.0f} s "
               f"({'timed out' if wall >= timeout else 'failed'}): {tail}"}
    finally:
        Path(result_path).unlink(missing_ok=True)
    out["wall_s"] = wall
    out["loadavg_before"] = load0
    return out


def _kill_tree(pid: int) -> None:
    """Stop a measurement we started: its process group, then any descendant left (Ray's raylet/workers)."""
    pids = tree_pids(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _gib(b: float) -> str:
    return f"{b / 1024**3:.2f}"


def describe(res: dict[str, Any]) -> str:
    s = res.get("spec", {})
    label = s.get("config") or f"{s.get('clients')} clients"
    if "error" in res:
        return f"{label:>16} nodes={s.get('nodes')}: {res['error']}"
    r = res["rounds"]
    tail = r[1:] or r
    mean = lambda k: sum(x[k] for x in tail) / len(tail)  # noqa: E731
    pk = res["memory_peak"]
    return (f"{label:>16} {res['backend']:>6} nodes={res['nodes']:<6} setup {res['setup_s']:6.1f} s | "
            f"to round 1 {res['start_to_first_round_s']:5.1f} s | round 1 {res['first_round_s']:5.1f} s | "
            f"steady {res['steady_round_s']:5.2f} s/round (in-app {mean('app_mean_ms'):5.1f} ms/client, "
            f"transport {mean('transport_ms_per_client'):5.1f} ms/client, server+eval {mean('outside_s'):4.2f} s) | "
            f"peak RSS {pk['peak_rss_gib']:.2f} GiB, PSS {pk['peak_pss_gib']:.2f} GiB | load {res['loadavg'][0]:.1f}")


def _merge(out_path: Path, results: list[dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if out_path.is_file():
        try:
            data = json.loads(out_path.read_text())
        except ValueError:
            data = {}
    for res in results:
        s = res.get("spec", {})
        key = (f"{s['config']} nodes={s.get('nodes')}" if s.get("config")
               else f"curve-{s.get('backend')}-nodes={s.get('nodes')}-{s.get('clients')}")
        if s.get("set"):
            key += " " + " ".join(x for x in s["set"] if not x.startswith("data.root="))
        if res.get("env"):
            key += " " + " ".join(f"{k}={v}" for k, v in sorted(res["env"].items()))
        data[key] = res
    data["_machine"] = machine()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(out_path)
    return data


def machine() -> dict[str, Any]:
    import platform

    import torch

    from fl_sim.engine.vectorized import cpu_model

    cpu = cpu_model()
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import flwr

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 1024**3, 1),
            "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
            "loadavg": os.getloadavg()}


# ============================================================================ plot
def plot(data: dict[str, Any], path: Path) -> Path:
    """Per-round time and memory curves of the scale runs (one line per population size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [v for k, v in data.items() if k.startswith("curve-") and "rounds" in v]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), dpi=80)
    styles = {"clients": "-", "per_round": "--"}
    colors = {100: "tab:blue", 1_000: "tab:orange", 10_000: "tab:green", 100_000: "tab:red"}
    for res in sorted(runs, key=lambda r: (r["spec"].get("nodes", ""), r["clients"])):
        s = res["spec"]
        ls = styles.get(s.get("nodes"), ":") if res["backend"] == "ray" else ":"
        label = f"{res['clients']:,} ({res['backend']}, {res['nodes']:,} nodes)"
        c = colors.get(res["clients"])
        rr = res["rounds"]
        axes[0].plot([r["round"] for r in rr], [r["round_s"] for r in rr], ls, marker="o", ms=3, color=c, label=label)
        mrounds = [(r["round"], r["memory"].get("pss", 0)) for r in rr if r.get("memory")]
        m0 = res.get("memory_round0") or {}
        if m0:
            mrounds.insert(0, (0, m0.get("pss", 0)))
        axes[1].plot([m[0] for m in mrounds], [m[1] / 1024**3 for m in mrounds], ls, marker="o", ms=3, color=c,
                     label=label)
        ser = res.get("memory_series") or []
        axes[2].plot([p[0] for p in ser], [p[1] / 1024**3 for p in ser], ls, color=c, lw=1, label=label)
    axes[0].set(title="time per round (round 1: start-up)", xlabel="round", ylabel="seconds")
    axes[1].set(title="process-tree PSS at the end of each round", xlabel="round", ylabel="GiB")
    axes[2].set(title="process-tree RSS over the run (0.2 s samples)", xlabel="seconds since start", ylabel="GiB")
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("fl-sim FIHT-CS (stateless), LeNet-5, 100 clients/round: solid = 1 SuperNode per client "
                 "(fl-sim run), dashed = 100 SuperNodes, dotted = inline", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ============================================================================ command line
def _fabricate(kind: str, spec_set: list[str]) -> list[str]:
    """Fabricate a dataset under the bench root; returns --set overrides pointing data.root at it."""
    from fl_sim.bench.plain_loop import fabricate_cifar10, fabricate_mnist

    if kind == "cifar10":
        root = bench_root() / "cifar10-50k"
        fabricate_cifar10(root, 50_000, 1000)
    elif kind == "mnist":
        root = bench_root() / "mnist-60k"
        fabricate_mnist(root, 60_000, 1000)
    else:
        raise SystemExit(f"--fabricate {kind!r}: use cifar10 or mnist")
    return [*spec_set, f"data.root={root}"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n")[0])
    p.add_argument("--clients", default=",".join(str(c) for c in DEFAULT_CLIENTS), help="population sizes")
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--backend", default="ray", choices=["ray", "inline"])
    p.add_argument("--nodes", default="clients", choices=["clients", "per_round"],
                   help="SuperNodes: one per client (fl-sim run today) or one per sampled client")
    p.add_argument("--num-cpus", type=float, default=1.0, help="simulation.num_cpus (CPUs per client actor)")
    p.add_argument("--method", default="fiht_cs", choices=["fiht_cs", "fetchsgd"])
    p.add_argument("--config", default=None, help="run this config instead of the curve")
    p.add_argument("--set", dest="set_", action="append", default=[], help="override for --config (repeatable)")
    p.add_argument("--fabricate", default=None, help="cifar10 | mnist: fake data of the real size for --config")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement (killed after)")
    p.add_argument("--out", type=Path, default=Path("bench_out/scale.json"))
    p.add_argument("--plot", type=Path, default=None, help="write the curves PNG here (e.g. docs/scale.png)")
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--data-root", type=Path, default=None,
                   help="where the curve's fabricated MNIST is written (default: a folder in the temp dir)")
    p.add_argument("--train-samples", type=int, default=CURVE_TRAIN_SAMPLES, help="the curve's fabricated images")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes for the test suite: 4 clients, 2 a round, 2 rounds, inline, 2,000 images")
    add_worker_options(p)
    a = p.parse_args(argv)
    if a.smoke:
        a.clients, a.per_round, a.rounds, a.backend, a.train_samples = "4", 2, 2, "inline", 2_000

    if (res := serve_worker(a, _worker)) is not None:
        return res
    if a.plot_only:
        data = json.loads(a.out.read_text())
        print(f"wrote {plot(data, a.plot or Path('docs/scale.png'))}")
        return data
    results = []
    if a.config:
        sets = _fabricate(a.fabricate, a.set_) if a.fabricate else list(a.set_)
        spec = {"config": a.config, "set": sets, "nodes": a.nodes}
        res = run_point(spec, a.timeout)
        print(describe(res), flush=True)
        results.append(res)
    else:
        from fl_sim.bench.plain_loop import fabricate_mnist

        root = (a.data_root or bench_root()) / f"mnist-{a.train_samples // 1000}k"
        fabricate_mnist(root, a.train_samples, 1000)
        for n in [int(c) for c in a.clients.split(",") if c]:
            spec = {"clients": n, "per_round": a.per_round, "rounds": a.rounds, "root": str(root),
                    "backend": a.backend, "num_cpus": a.num_cpus, "method": a.method, "nodes": a.nodes}
            res = run_point(spec, a.timeout)
            print(describe(res), flush=True)
            results.append(res)
    data = _merge(a.out, results)
    if a.plot:
        print(f"wrote {plot(data, a.plot)}")
    return data


if __name__ == "__main__":
    main()
