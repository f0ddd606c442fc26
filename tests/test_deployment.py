"""A real Flower deployment on loopback: flower-superlink, two flower-supernode processes, `flwr run`.

Insecure mode, free ports, runtime dependency installation disabled, a FLWR_HOME per process. Every
process started here is stopped by its PID in a finally block, also when the test fails.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
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
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None, reason="Flower CLI not installed")
def test_superlink_two_supernodes_fihtcs(tmp_path):
    port = _free_port()
    env_base = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        home = tmp_path / name
        home.mkdir()
        log = open(tmp_path / f"{name}.log", "w")
        logs.append(log)
        p = subprocess.Popen(args, cwd=tmp_path, env={**env_base, "FLWR_HOME": str(home)}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    out_dir = tmp_path / "runs"
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)])
        _wait_port(port)
        for i in range(2):
            start(f"node{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                               "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2"])
        cli_home = tmp_path / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        overrides = (f"clients=4 clients_per_round=2 model.hidden=[16] out={out_dir} name=deploy "
                     "strategy.compression=4")
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "test", "--stream",
             "--run-config", f"rounds=2 config='fiht_cs' overrides='{overrides}'"],
            cwd=tmp_path, env={**env_base, "FLWR_HOME": str(cli_home)}, capture_output=True, text=True, timeout=240,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        assert "[fl-sim] final test accuracy" in output, output[-3000:]
        runs = list(out_dir.glob("deploy-*"))
        assert len(runs) == 1, output[-2000:]
        lines = (runs[0] / "metrics.csv").read_text().strip().splitlines()
        header = lines[0].split(",")
        assert len(lines) == 4  # header + rounds 0, 1, 2
        row = dict(zip(header, lines[2].split(",")))
        assert float(row["uplink_bits"]) > 0 and float(row["compression_ratio"]) > 3.5
    finally:
        for p in reversed(procs):
            _stop(p)
        for log in logs:
            log.close()
