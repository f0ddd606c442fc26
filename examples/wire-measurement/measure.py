"""Measure each codec's reply size in a real Flower deployment: a SuperLink and two SuperNodes on loopback.

Starts ``flower-superlink`` and two ``flower-supernode`` processes (insecure, free ports, runtime dependency
installation off, a FLWR_HOME each), then ``flwr run`` of ``wireapp`` once per codec; the ServerApp writes
each reply's sizes (wireapp/server_app.py). Every process started here is stopped by its PID at the end.

Usage (from any directory, with fl-sim and Flower installed): ``python examples/wire-measurement/measure.py
[--out wire_deploy.json] [--codecs topk,qsgd,sign,qcs]``. Prints one row per codec.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CODECS = {
    "topk": {"k": 1000},
    "qsgd": {"levels": 4},
    "sign": {},
    "qcs": {"block": 256, "k": 110, "levels": 2},
}


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
            proc.wait(timeout=10)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def measure(codecs: dict[str, dict], work: Path) -> list[dict]:
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        home = work / name
        home.mkdir()
        log = open(work / f"{name}.log", "w")
        procs.append(subprocess.Popen(args, cwd=work, env={**env, "FLWR_HOME": str(home)}, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))

    port = _free_port()
    results = []
    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)])
        _wait_port(port)
        for i in range(2):
            start(f"node{i}", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                               "--port", str(_free_port()), "--node-config", f"partition-id={i} num-partitions=2"])
        cli = work / "cli"
        cli.mkdir()
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        for codec, params in codecs.items():
            out = work / f"{codec}.json"
            config = f"codec='{codec}' codec-params='{json.dumps(params)}' out='{out}'"
            run = subprocess.run([str(BIN / "flwr"), "run", str(APP), "local", "--stream", "--run-config", config],
                                 cwd=work, env={**env, "FLWR_HOME": str(cli)}, capture_output=True, text=True,
                                 timeout=300)
            if run.returncode != 0 or not out.exists():
                raise RuntimeError(f"flwr run for {codec} failed:\n{(run.stdout + run.stderr)[-3000:]}")
            results.append(json.loads(out.read_text()))
    finally:
        for p in reversed(procs):
            _stop(p)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("wire_deploy.json"))
    parser.add_argument("--codecs", default=",".join(CODECS), help=f"comma-separated, from {', '.join(CODECS)}")
    args = parser.parse_args(argv)
    names = [c for c in args.codecs.split(",") if c]
    unknown = [c for c in names if c not in CODECS]
    if unknown:
        parser.error(f"unknown codec(s) {unknown}; choose from {', '.join(CODECS)}")
    with tempfile.TemporaryDirectory(prefix="fl-sim-wire-") as tmp:
        results = measure({c: CODECS[c] for c in names}, Path(tmp))
    print("codec  replies  counted_bits  payload_bytes  message_bytes  framing_bytes  server_bits_per_reply")
    for r in results:
        for row in r["rows"]:
            framing = row["message_bytes"] - row["payload_bytes"]
            print(f"{r['codec']:6s} round {row['round']} node {row['node'] % 10000:4d}  {row['counted_bits']:8d}  "
                  f"{row['payload_bytes']:8d}  {row['message_bytes']:8d}  {framing:6d}  "
                  f"{row.get('server_round_uplink_bits', 0) / 2:.0f}")
    tmp_out = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp_out.write_text(json.dumps(results, indent=2))
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
