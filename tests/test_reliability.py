"""Careless users, faulty machines, malicious files: each case ends in one line and a non-zero exit, in
seconds, never a traceback or a hang.

* configs that made Flower wait forever (a sampling fraction above 1, more nodes required than exist,
  a billion clients, a ray_address that answers TCP but is not Ray): exit 2, one line;
* values that raised deep inside (a zero compression ratio, guards given a number), a disk that fills
  during a checkpoint, a truncated MNIST .gz, a pickle that asks for gigabytes: one line naming them.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fl_sim.cli import app

from test_cli import ROOT, SMALL

runner = CliRunner()


def one_line_error(res, *words, code=2):
    """Exit ``code``, no traceback, the error on one line (the last) that names every word."""
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:"), res.output
    for w in words:
        assert w in last, (w, res.output)


def run_cli(tmp_path, *sets, config=None):
    args = ["run"] + ([config] if config else []) + SMALL + [x for s in sets for x in ("--set", s)]
    return runner.invoke(app, args + ["--out", str(tmp_path / "o")])


# ------------------------------------------------------------------ waits that never ended
@pytest.mark.parametrize("sets, words", [
    (["strategy.fraction_train=2.0"], ["strategy.fraction_train=2.0", "(0, 1]"]),
    (["strategy.fraction_train=1.5"], ["strategy.fraction_train=1.5", "(0, 1]"]),
    (["strategy.fraction_evaluate=1.5"], ["strategy.fraction_evaluate=1.5", "[0, 1]"]),
    (["strategy.min_available_nodes=9"], ["strategy.min_available_nodes=9", "8 SuperNodes"]),
    (["strategy.min_train_nodes=100"], ["strategy.min_train_nodes=100", "8 SuperNodes"]),
    (["simulation.supernodes=4", "strategy.min_train_nodes=5"], ["strategy.min_train_nodes=5", "4 SuperNodes"]),
    (["clients=1000000000"], ["clients=1000000000", "100,000,000"]),
])
def test_endless_waits_refused(sets, words, tmp_path):
    one_line_error(run_cli(tmp_path, *sets), *words)


def test_node_options_within_bounds_still_run(tmp_path):
    res = run_cli(tmp_path, "strategy.fraction_train=1.0", "strategy.min_available_nodes=8",
                  "strategy.min_train_nodes=3")
    assert res.exit_code == 0, res.output


def test_memory_precheck_bounds_clients_before_drawing_them(monkeypatch):
    """10^8 synthetic clients: the pre-check refuses from n_k >= 50 without drawing one size per client."""
    import fl_sim.data.synthetic as synthetic
    import fl_sim.engine.memory as memory
    from fl_sim.config import config_from_dict

    def per_client(*_):
        raise AssertionError("client sizes drawn before the bound was checked")

    monkeypatch.setattr(synthetic, "client_sizes", per_client)
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**36)  # a 64 GiB machine
    cfg = config_from_dict({"clients": 10**8})
    with pytest.raises(MemoryError, match="100,000,000 clients"):
        memory.check_experiment(cfg)


@pytest.fixture
def not_ray():
    """A TCP server that accepts and answers like a web server: the port is open, Ray is not there."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(5)
    srv.close()


def test_ray_address_that_is_not_ray(not_ray, tmp_path):
    address = f"127.0.0.1:{not_ray}"
    res = runner.invoke(app, ["run", *SMALL, "--set", "simulation.backend=ray", "--set",
                              f"simulation.ray_address={address}", "--out", str(tmp_path / "o")])
    one_line_error(res, address, "not a Ray cluster")


# ------------------------------------------------------------------ tracebacks
@pytest.mark.parametrize("sets, words", [
    (["strategy.compression=0"], ["compression=0", "> 0"]),
    (["strategy.compression=-2"], ["compression=-2", "> 0"]),
    (["strategy.guards=5"], ["strategy.guards=5", "mapping"]),
    (["strategy.recovery=zzz"], ["recovery='zzz'", "'biht'"]),
])
def test_onebit_bad_options_one_line(sets, words, tmp_path):
    one_line_error(run_cli(tmp_path, *sets, config="onebit_cs"), *words)


def test_fiht_max_iter_zero_one_line(tmp_path):
    one_line_error(run_cli(tmp_path, "strategy.max_iter=0", config="fiht_cs"), "max_iter=0")


def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch):
    """A disk with 600 bytes left when the checkpoint is written: the file takes what fits, then ENOSPC (as
    write(2) does). torch.save wrote straight to the file and failed with "[enforce fail at
    inline_container.cc] unexpected pos" (a traceback; measured the same on a full 256 KiB tmpfs); now
    one line with the path and the cause, and no temporary left behind."""
    import fl_sim.runs.checkpoint as checkpoint

    class NearlyFullDisk(io.FileIO):
        free = 600

        def write(self, b):
            if NearlyFullDisk.free <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = min(len(b), NearlyFullDisk.free)
            NearlyFullDisk.free -= n
            return super().write(bytes(b)[:n])

    def full_open(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).parent.name == "checkpoint":
            return NearlyFullDisk(path, "w")  # unbuffered, as the disk sees the writes
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", full_open, raising=False)
    res = run_cli(tmp_path, "rounds=3", "checkpoint_every=1")
    one_line_error(res, "No space left", "checkpoint")
    assert not [p for p in (tmp_path / "o" / "checkpoint").iterdir() if p.name.endswith(".tmp")]


def test_truncated_mnist_gz_one_line(tmp_path):
    from fl_sim.data.files import write_idx

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    y = (np.arange(40) % 10).astype(np.uint8)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((40, 28, 28), np.uint8), gz=True)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, gz=True)
    gz = raw / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    res = run_cli(tmp_path, "data.name=mnist", f"data.root={tmp_path / 'data'}")
    one_line_error(res, "train-images-idx3-ubyte.gz", "truncated")
    assert "Aborted" not in res.output


def _with_memory_cap(extra_bytes: int, fn):
    """``fn()`` with the address space capped at ``extra_bytes`` above what the process uses now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        return fn()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_idx_gz_reads_stop_at_the_declared_size(tmp_path):
    """A 150 KB .gz that inflates to 160 MB behind a header declaring 20 images: the read stops after the
    declared 15,680 bytes (f.read() inflated all of it; capped at 64 MB more, that was a MemoryError), and
    a header declaring 2^40 bytes is refused before any data is read."""
    import gzip

    from fl_sim.data.errors import DataError
    from fl_sim.data.files import read_idx

    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(x).to_bytes(4, "big") for x in (20, 28, 28)))
        zeros = bytes(1 << 20)
        for _ in range(160):
            f.write(zeros)
    assert bomb.stat().st_size < 400_000
    with pytest.raises(DataError, match="found more data bytes"):
        _with_memory_cap(64 << 20, lambda: read_idx(bomb))
    huge = tmp_path / "t10k-images-idx3-ubyte"
    huge.write_bytes(bytes([0, 0, 8, 3]) + b"".join(int(x).to_bytes(4, "big") for x in (2**20, 2**10, 2**10)))
    with pytest.raises(DataError, match="declares shape"):
        read_idx(huge)


def test_unexpected_exception_is_one_line_exit_1(tmp_path, monkeypatch):
    """Whatever no check anticipated: one line naming the exception and --debug, exit 1."""
    import fl_sim.runs.simulation as simulation

    def broken(*_a, **_k):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(simulation, "build_experiment", broken)
    res = run_cli(tmp_path)
    one_line_error(res, "ZeroDivisionError", "--debug", code=1)
    with pytest.raises(ZeroDivisionError):
        runner.invoke(app, ["run", *SMALL, "--out", str(tmp_path / "d"), "--debug"], catch_exceptions=False)


# ------------------------------------------------------------------ pickle bombs in data files
CIFAR = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_dir(tmp_path, first: bytes) -> Path:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR:
        batch = {"labels": rng.integers(0, 10, 4).tolist(), "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    (base / "data_batch_1").write_bytes(first)
    return tmp_path


def reconstruct_bomb(n: int) -> bytes:
    """65 bytes: numpy's ``_reconstruct(ndarray, (n,), b'b')``, which allocates n bytes at once."""
    return (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ" + n.to_bytes(4, "little")
            + b"\x85C\x01b\x87R.")


def shared_list_bomb(depth: int) -> bytes:
    """A dict whose 'data' is a list of 10 references to a list of 10 references ... (10^depth numbers):
    a few hundred bytes that np.asarray would expand element by element."""
    inner: list = [0]
    for _ in range(depth):
        inner = [inner] * 10
    return pickle.dumps({"data": inner, "labels": [0]}, protocol=2)


def void_dtype_bomb() -> bytes:
    """A 2 GiB void dtype and an array of it: the dtype is refused before any array has it."""
    class Big:
        def __reduce__(self):
            return np.dtype, ("V2000000000", False, True)

    return pickle.dumps({"data": Big(), "labels": [0]}, protocol=2)


@pytest.mark.parametrize("bomb, words", [
    (lambda: reconstruct_bomb(2**31 - 1), ["_reconstruct", "2147483647"]),
    (lambda: shared_list_bomb(9), ["'data'", "uint8"]),
    (void_dtype_bomb, ["dtype", "V2000000000"]),
])
def test_pickle_bombs_refused_before_allocating(bomb, words, tmp_path, monkeypatch):
    """The restricted unpickler builds nothing larger than its file: the bomb is refused with one line
    while the process's address space is capped at 1 GiB above what it uses (an allocation of the bomb's
    size would raise MemoryError instead of the refusal)."""
    from fl_sim.config import DataConfig
    from fl_sim.data import load_federated
    from fl_sim.data.errors import DataError

    data = bomb()
    assert len(data) < 400
    root = cifar_dir(tmp_path, data)
    with pytest.raises(DataError) as err:
        _with_memory_cap(1 << 30, lambda: load_federated(DataConfig(name="cifar10", root=str(root),
                                                                    partition="iid"), 4, 0))
    msg = str(err.value)
    assert "\n" not in msg and "data_batch_1" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_genuine_protocol_5_batches_with_numpy_labels_still_load(tmp_path):
    """Arrays pickled by NumPy itself (protocol 2 and 5) pass the bounded reconstruction."""
    from fl_sim.config import DataConfig
    from fl_sim.data import load_federated

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    for i, name in enumerate(CIFAR):
        batch = {"batch_label": "b", "labels": rng.integers(0, 10, 6).tolist(),
                 "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), "filenames": [b"x.png"] * 6}
        (base / name).write_bytes(pickle.dumps(batch, protocol=5 if i % 2 else 2))
    fd = load_federated(DataConfig(name="cifar10", root=str(tmp_path), partition="iid"), 3, 0)
    assert fd.client_sizes.sum() == 30


# ------------------------------------------------------------------ sweep grid keys
def _grid_values(name: str, default):
    """Two valid values of a top-level key, both unlike its default."""
    special = {"clients": ("7", "9"), "clients_per_round": ("2", "3"), "rounds": ("1", "2"),
               "checkpoint_every": ("0", "1"), "eval_every": ("2", "3"), "eval_tail": ("0.2", "0.5")}
    if name in special:
        return special[name]
    if isinstance(default, bool):
        return ("true", "false")
    if isinstance(default, (int, float)):
        return (str(default + 1), str(default + 2))
    return ("alpha", "beta")


def _top_level_scalars():
    import dataclasses

    from fl_sim.config import RunConfig

    cfg = RunConfig()
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(RunConfig)
            if not dataclasses.is_dataclass(getattr(cfg, f.name)) and not isinstance(getattr(cfg, f.name), dict)]


@pytest.mark.parametrize("key, default", _top_level_scalars())
def test_every_top_level_key_works_as_a_grid_key(key, default, tmp_path):
    """The grid's value reaches the run's config (``--grid seed=1,2`` ran seed 0 twice: the repeat seed
    override came after the grid's and won)."""
    from fl_sim.runs.results import RunRecorder
    from fl_sim.experiments.sweep import run_sweep

    seen = []

    def fake_run(cfg, run_dir, **_):
        from fl_sim.runs.checkpoint import config_hash
        from fl_sim.config import config_to_dict

        seen.append(cfg)
        rec = RunRecorder(Path(run_dir), config_to_dict(cfg))
        rec.add({"round": 0, "test_accuracy": 0.5, "test_loss": 1.0, "wall_s": 0.0})
        rec.finish({"config_hash": config_hash(config_to_dict(cfg))})

    from fl_sim.config import load_config

    values = _grid_values(key, default)
    fixed = ["model.hidden=[8]"] + [f"{k}={v}" for k, v in (("clients", 10), ("clients_per_round", 1)) if k != key]
    rows = run_sweep(None, [f"{key}={','.join(values)}"], tmp_path / "sw", repeats=2, runner=fake_run, overrides=fixed)
    assert len(seen) == 4 and len(rows) == 4
    for cfg, want in zip(seen, [v for v in values for _ in range(2)]):
        if key != "seed":
            assert getattr(cfg, key) == getattr(load_config(None, fixed + [f"{key}={want}"]), key) != default
            assert all(r[key] in values for r in rows)
    if key == "seed":  # repeats count up from the point's seed: 1, 2 and 2, 3
        assert [c.seed for c in seen] == [1, 2, 2, 3]
        assert [r["seed"] for r in rows] == [1, 2, 2, 3]
        assert [Path(r["run_dir"]).name for r in rows] == ["seed1", "seed2", "seed2", "seed3"]


# ------------------------------------------------------------------ reproduce --out
def test_reproduce_refuses_a_dir_holding_a_run(tmp_path):
    """``fl-sim reproduce X --out DIR`` replaced the summary.json of a finished run in DIR silently; now the
    rule of ``fl-sim run --out``: refused with one line unless --overwrite. Its own earlier output is
    replaced (a rerun), another experiment's is refused."""
    import json

    import yaml

    from test_reproduce import TINY

    d = tmp_path / "r"
    assert runner.invoke(app, ["run", *SMALL, "--out", str(d)]).exit_code == 0
    before = (d / "summary.json").read_bytes()
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    res = runner.invoke(app, ["reproduce", str(spec), "--out", str(d)])
    one_line_error(res, str(d), "--overwrite", "summary.json")
    assert (d / "summary.json").read_bytes() == before
    res = runner.invoke(app, ["reproduce", str(spec), "--out", str(d), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "summary.json").read_text())["experiment"] == "tiny_qcs"
    assert not (d / "metrics.csv").exists() and not (d / "config.yaml").exists()  # the run's files went
    assert runner.invoke(app, ["reproduce", str(spec), "--out", str(d)]).exit_code == 0  # its own output
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "name": "tiny_other"}))
    one_line_error(runner.invoke(app, ["reproduce", str(other), "--out", str(d)]), str(d), "--overwrite")


# ------------------------------------------------------------------ Ctrl-C
def _popen(script_or_args, **kw):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-c", script_or_args] if isinstance(script_or_args, str) else script_or_args
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kw)


def _stop(p):
    import signal

    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_ctrl_c_through_typer_leaves_despite_a_waiting_thread():
    """Typer turns Ctrl-C into SystemExit(130), which main() let through: the interpreter then waited for
    Flower's ServerApp thread (not a daemon, waiting for replies) without end."""
    import signal

    script = ("import threading, time, typer, fl_sim.cli as c\n"
              "app = typer.Typer()\n"
              "@app.command()\n"
              "def run():\n"
              "    threading.Thread(target=time.sleep, args=(600,)).start()  # the waiting ServerApp thread\n"
              "    print('ready', flush=True); time.sleep(600)\n"
              "c.app = app\nc.main()\n")
    p = _popen(script)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
        assert "interrupted" in p.stderr.read()
    finally:
        _stop(p)


def test_an_error_exit_leaves_despite_a_waiting_thread():
    """The same for any exit code: an error after the ServerApp thread started must not hang the exit."""
    script = ("import threading, time, typer, fl_sim.cli as c\n"
              "app = typer.Typer()\n"
              "@app.command()\n"
              "def run():\n"
              "    threading.Thread(target=time.sleep, args=(600,)).start()\n"
              "    raise typer.Exit(2)\n"
              "c.app = app\nc.main()\n")
    p = _popen(script)
    try:
        assert p.wait(timeout=30) == 2
    finally:
        _stop(p)


@pytest.mark.e2e
@pytest.mark.parametrize("to_group", [False, True])
def test_ctrl_c_on_the_ray_backend(to_group, tmp_path):
    """Ctrl-C (to the process, or to its group as a terminal sends it) once round 1 is checkpointed: exit 130
    within seconds with the checkpoint kept, and the run resumes from it. Before: still running minutes later."""
    import signal
    import sys
    import time

    out = tmp_path / "r"
    sets = ["rounds=60", "clients=4", "clients_per_round=2", "model.hidden=[8]", "checkpoint_every=1",
            "simulation.backend=ray", "simulation.ray_num_cpus=2"]
    p = _popen([sys.executable, "-c", "from fl_sim.cli import main; main()", "run",
                *[x for s in sets for x in ("--set", s)], "--out", str(out)])
    try:
        t0 = time.monotonic()
        while not list(out.glob("checkpoint/round-*.pt")):
            assert p.poll() is None and time.monotonic() - t0 < 180, p.stderr.read()[-2000:] if p.poll() else "slow"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT) if to_group else p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130  # measured 1.5 s on a loaded 2-core machine; minutes before
        err = p.stderr.read()
        assert "Traceback" not in err and "--resume" in err
    finally:
        _stop(p)
    assert list(out.glob("checkpoint/round-*.pt")) and not (out / "summary.json").exists()
    res = runner.invoke(app, ["run", "--resume", str(out), "--set", "simulation.backend=inline"])
    assert res.exit_code == 0, res.output
