"""The Ray backend pointed at an existing Ray cluster (simulation.ray_address), on loopback.

A Ray head is started here with `ray start --head --block` in its own session, temp dir and port; the
2-round fl-sim run connects to it instead of starting a local Ray. Proof that it ran there: the head's
session directory holds a core-driver log named with this test process's PID (a driver that started
its own Ray would log under /tmp/ray instead) and core-worker logs of the actors. Every process of
the head (snapshot of its process tree, plus any process whose command line names the unique temp
dir) is stopped by PID in a finally block; `ray stop` is not used: it stops every Ray process of the
user, other people's included.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fl_sim.config import config_from_dict
from fl_sim.testing import run_in_memory

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def _config(ray_address: str):
    """2 rounds of FedAvg on 12 synthetic clients, 4 per round, through the Ray backend at ``ray_address``."""
    return config_from_dict({
        "rounds": 2, "clients": 12, "clients_per_round": 4,
        "data": {"name": "synthetic", "partition": "natural"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"lr": 0.05, "batch_size": 16},
        "simulation": {"backend": "ray", "ray_address": ray_address},
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head does not listen on 127.0.0.1:{port} after {timeout} s")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            out.setdefault(int(stat[stat.rfind(")") + 2 :].split()[1]), []).append(int(entry.name))
    return out


def _tree(root: int) -> set[int]:
    """``root`` (a real PID, > 1) and its descendants."""
    if root <= 1:
        raise ValueError(f"root={root}: a process tree needs a real PID (> 1)")
    children, pids, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        pids.add(pid)
        todo.extend(children.get(pid, []))
    return pids


def _tagged(tag: str) -> set[int]:
    """Processes whose command line contains ``tag`` (the head's unique temp dir: GCS, raylet, workers)."""
    out = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if tag.encode() in Path(entry.path, "cmdline").read_bytes():
                    out.add(int(entry.name))
            except OSError:
                pass
    return out


def _kill(pids: set[int], sig: int) -> None:
    """Signal each PID in ``pids`` by itself; never 0, -1 or a group (os.kill(-1, ...) signals every process)."""
    for pid in pids:
        if pid <= 1 or pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="Ray CLI not installed")
def test_simulation_on_an_existing_ray_cluster(tmp_path):
    import ray

    from fl_sim.runs.simulation import run_experiment

    port = _free_port()
    temp = tempfile.mkdtemp(prefix="flsim-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    log = tmp_path / "ray-head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    head = None
    try:
        with open(log, "w") as fh:
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                 "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        _wait_port(port, head, log)

        cfg = _config(f"127.0.0.1:{port}")
        summary = run_experiment(cfg, tmp_path / "run")
        assert not ray.is_initialized()  # Flower disconnected the driver; the cluster keeps running

        lines = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
        assert len(lines) == 4  # header + rounds 0, 1, 2
        assert summary["rounds"] == 2 and summary["total_uplink_bits"] > 0
        # Same computation as the in-memory grid: the cluster changes where clients run, not what they compute.
        _, rows, _ = run_in_memory(cfg)
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_test_accuracy"] == pytest.approx(
            rows[-1]["test_accuracy"], abs=1e-9
        )
        # It ran on the head started above: this process was a driver of that cluster, and actors ran there.
        logs = [p.name for p in Path(temp).glob("session_*/logs/*")]
        assert any(n.startswith("python-core-driver-") and n.endswith(f"_{os.getpid()}.log") for n in logs), logs
        assert any(n.startswith("python-core-worker-") for n in logs), logs
        assert head.poll() is None, log.read_text()[-2000:]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            _kill(_tree(head.pid) | _tagged(temp), signal.SIGTERM)  # head not yet reaped: its PID is still its own
            try:
                head.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _kill(_tree(head.pid), signal.SIGKILL)
                head.wait(timeout=10)
            time.sleep(0.5)
            _kill(_tagged(temp), signal.SIGKILL)  # stragglers re-parented away from the head
        shutil.rmtree(temp, ignore_errors=True)
