"""Flower's deployment engine on loopback: a SuperLink and SuperNodes as child processes, then ``flwr run``.

``with LoopbackDeployment(work, nodes=2) as dep: dep.flwr_run(app_dir, "k=v ...")`` starts
``flower-superlink`` (insecure, runtime dependency installation disabled, one port for Fleet, Control and
Runtime) and ``nodes`` ``flower-supernode`` processes (``--node-config "partition-id=i num-partitions=n"``),
each in its own session with its own FLWR_HOME under ``work`` and its log in ``work/<name>.log``; a
connection ``local`` for the ``flwr`` CLI points at the SuperLink. Leaving the block stops every process
it started by its PID (its process group: SIGTERM, then SIGKILL after 10 s), also after an error.
The Flower executables are looked up beside the running Python (its virtualenv's ``bin``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["LoopbackDeployment", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class LoopbackDeployment:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 for the duration of a ``with`` block (module docstring)."""

    def __init__(self, work: Path, nodes: int = 2, *, bin_dir: Path | None = None) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: a deployment needs at least one SuperNode")
        self.work, self.nodes = Path(work), int(nodes)
        self.bin = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen] = []
        self._logs: list = []
        self.port = 0
        self.cli_home = self.work / "cli"

    def _start(self, name: str, args: list[str]) -> None:
        home = self.work / name
        home.mkdir(parents=True)
        log = open(self.work / f"{name}.log", "w")
        self._logs.append(log)
        self.procs.append(subprocess.Popen(args, cwd=self.work, env={**self.env, "FLWR_HOME": str(home)}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> "LoopbackDeployment":
        try:
            self.port = free_port()
            self._start("superlink", [str(self.bin / "flower-superlink"), "--insecure",
                                      "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                      "--port", str(self.port)])
            _wait_port(self.port)
            for i in range(self.nodes):
                self._start(f"node{i}", [str(self.bin / "flower-supernode"), "--insecure", "--superlink",
                                         f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config",
                                         f"partition-id={i} num-partitions={self.nodes}"])
            self.cli_home.mkdir(parents=True)
            (self.cli_home / "config.toml").write_text(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
                "insecure = true\n")
        except BaseException:
            self.close()
            raise
        return self

    def flwr_run(self, app: Path, run_config: str, *, timeout: float = 300) -> subprocess.CompletedProcess:
        """``flwr run APP local --stream --run-config RUN_CONFIG`` against this deployment (output captured)."""
        return subprocess.run([str(self.bin / "flwr"), "run", str(app), "local", "--stream", "--run-config", run_config],
                              cwd=self.work, env={**self.env, "FLWR_HOME": str(self.cli_home)}, capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        """Stop every process started here by its PID (newest first) and close the logs."""
        for p in reversed(self.procs):
            _stop(p)
        for log in self._logs:
            log.close()
        self.procs, self._logs = [], []

    def __exit__(self, *exc) -> None:
        self.close()
