"""The fl-sim CLI: one-line errors with exit code 2 and no traceback; run/report/sweep end to end inline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl_sim.cli import app

runner = CliRunner()

SMALL = ["--set", "rounds=2", "--set", "clients=8", "--set", "clients_per_round=3", "--set", "model.hidden=[8]",
         "--set", "simulation.backend=inline"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "--set", "train.lr=-1"], ["train.lr", "> 0"]),
        (["run", "--set", "trian.lr=1"], ["trian", "allowed"]),
        (["run", "--set", "data.name=mnist", "--set", "data.root=/nonexistent"], ["MNIST", "/nonexistent"]),
        (["run", "no-such-config.yaml"], ["no-such-config"]),
        (["report", "/nonexistent-run"], ["metrics.csv"]),
        (["sweep", "--grid", "rounds"], ["--grid", "key.sub=v1,v2"]),
    ],
)
def test_user_errors_exit_2_one_line(args, words, tmp_path):
    res = runner.invoke(app, args + ["--out", str(tmp_path / "o")] if args[0] != "report" else args)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text
    for w in words:
        assert w in text, (w, text)


def test_run_report_inline(tmp_path):
    res = runner.invoke(app, ["run", *SMALL, "--out", str(tmp_path / "fedavg")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "configs/topk_ef.yaml", *SMALL, "--out", str(tmp_path / "topk")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "topk" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_test_accuracy"] is not None
    # model.pt is the final global model: loaded into the config's model it gives the final test accuracy
    import torch
    from flwr.app import ArrayRecord

    from fl_sim.runs.build import build_experiment
    from fl_sim.config import load_config

    exp = build_experiment(load_config(tmp_path / "topk" / "config.yaml"))
    state = torch.load(tmp_path / "topk" / "model.pt")
    _, acc = exp.evaluate(ArrayRecord(state))
    assert acc == summary["final_test_accuracy"]
    res = runner.invoke(app, ["report", str(tmp_path / "fedavg"), str(tmp_path / "topk"), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "accuracy_vs_round.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "accuracy_vs_uplink_bits.png").stat().st_size > 1000


def test_sweep_resumes(tmp_path):
    args = ["sweep", "--grid", "train.lr=0.05,0.1", "--repeats", "2", *SMALL, "--out", str(tmp_path / "sw")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "sw" / "sweep.csv").read_text().strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("train.lr,seed,final_test_accuracy")
    assert (tmp_path / "sw" / "sweep_accuracy.png").is_file()
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and res.output.count("skipped") == 4


def test_console_script_exits_2_without_traceback():
    exe = Path(sys.executable).parent / "fl-sim"
    if not exe.exists():
        pytest.skip("console script not installed")
    p = subprocess.run([str(exe), "run", "--set", "clients_per_round=1000"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and "clients_per_round" in p.stderr


def test_run_that_never_aggregates_exits_1(tmp_path, monkeypatch):
    """With the ClientApp's compression_mod gone, every reply of a compressed method is rejected; the run
    used to exit 0 (and save the initial model). Now round 1 stops it: one error line naming the mod,
    exit code 1, no model.pt, summary.json marked failed."""
    import fl_sim.clients.app as client_app

    monkeypatch.setattr(client_app, "compression_mod", lambda msg, ctx, call_next: call_next(msg, ctx))
    res = runner.invoke(app, ["run", "configs/topk_ef.yaml", *SMALL, "--out", str(tmp_path / "r")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "lacks compression_mod" in res.output
    assert not (tmp_path / "r" / "model.pt").exists()
    assert "compression_mod" in json.loads((tmp_path / "r" / "summary.json").read_text())["failed"]


def _one_line_error(res, *words):
    """Exit 2, no traceback, the error on one line (the last) that names every word."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:"), res.output
    for w in words:
        assert w in last, (w, res.output)


def test_run_refuses_an_occupied_dir(tmp_path):
    """A second `run --out DIR` on a finished run no longer replaces it silently."""
    d = tmp_path / "r"
    assert runner.invoke(app, ["run", *SMALL, "--out", str(d)]).exit_code == 0
    before = (d / "summary.json").read_bytes()
    res = runner.invoke(app, ["run", *SMALL, "--set", "seed=5", "--out", str(d)])
    _one_line_error(res, str(d), "--resume", "--overwrite")
    assert (d / "summary.json").read_bytes() == before and "seed: 0" in (d / "config.yaml").read_text()
    res = runner.invoke(app, ["run", *SMALL, "--set", "seed=5", "--out", str(d), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((d / "summary.json").read_text())["seed"] == 5


def test_run_refuses_a_locked_dir(tmp_path):
    """While one run holds DIR/.lock, another run on DIR fails at once with one line."""
    import fcntl

    d = tmp_path / "r"
    d.mkdir()
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        res = runner.invoke(app, ["run", *SMALL, "--out", str(d)])
    _one_line_error(res, "another fl-sim run", str(d))
    assert not (d / "config.yaml").exists()


def test_sweep_reruns_points_whose_config_changed(tmp_path):
    """Changed fixed settings are not 'done'; unchanged engine settings are."""
    args = ["sweep", "--grid", "train.lr=0.05", *SMALL, "--out", str(tmp_path / "sw")]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args + ["--set", "rounds=3"])
    assert res.exit_code == 0, res.output
    assert "skipped" not in res.output and "config changed" in res.output
    summary = json.loads((tmp_path / "sw" / "train.lr=0.05" / "seed0" / "summary.json").read_text())
    assert summary["rounds"] == 3
    res = runner.invoke(app, args + ["--set", "rounds=3", "--set", "simulation.log_level=ERROR"])
    assert res.exit_code == 0 and res.output.count("skipped") == 1, res.output


def test_sweep_point_names_are_injective(tmp_path):
    """Sweep point names are injective: hf:/a/b.parquet and hf:/a_b.parquet used to share one directory."""
    from fl_sim.experiments.sweep import _point_name, run_sweep

    seen = []

    def fake_runner(cfg, run_dir, **kw):
        seen.append(cfg.data.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.csv").write_text("round,test_accuracy\n0,0.5\n")
        (run_dir / "summary.json").write_text(json.dumps({"final_test_accuracy": 0.5, "config_hash": "x"}))

    rows = run_sweep(None, ["data.name=hf:/a/b.parquet,hf:/a_b.parquet,hf:/a%2Fb.parquet"], tmp_path / "sw",
                     runner=fake_runner)
    assert seen == ["hf:/a/b.parquet", "hf:/a_b.parquet", "hf:/a%2Fb.parquet"]
    assert len({r["run_dir"] for r in rows}) == 3
    names = [(("k", "a/b"),), (("k", "a_b"),), (("k", "a%2Fb"),), (("k", "x" * 300),), (("k", "x" * 299 + "y"),)]
    made = [_point_name(p) for p in names]
    assert len(set(made)) == len(made) and all("/" not in n and len(n) <= 200 for n in made)


def _mnist_with_label(root: Path, label: int) -> None:
    import numpy as np

    from fl_sim.data.files import write_idx

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    y = np.arange(20, dtype=np.uint8) % 10
    y[3] = label
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((20, 28, 28), np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte", y)


# Each bad value ends in one line naming it, exit 2, no traceback.
BAD_VALUES = {
    # sizes that cannot fit (estimate and the machine's memory, before allocating)
    "hidden_1e8": (["model.hidden=[100000000]"], ["model.hidden", "GiB", "available"]),
    "synthetic_classes_1e7": (["data.synthetic_classes=10000000"], ["synthetic_classes", "GiB", "available"]),
    "qcs_block_2_40": (["strategy.name=qcs", "strategy.block=1099511627776"], ["strategy.block", "GiB"]),
    "rlc_m_1e9": (["strategy.name=rlc", "strategy.m=1000000000", "channel.snr_db=10"], ["strategy.m", "GiB"]),
    "count_sketch_rows_1e6": (["strategy.name=compressed", "codec.name=count_sketch", "codec.rows=1000000"],
                              ["codec.rows", "GiB"]),
    "fetchsgd_cols_1e9": (["strategy.name=fetchsgd", "strategy.cols=1000000000"], ["strategy.cols", "GiB"]),
    # values that make nothing learn
    "lr_inf": (["train.lr=inf"], ["train.lr", "finite"]),
    "lr_1e308": (["train.lr=1e308"], ["train.lr", "1000"]),
    "weight_decay_inf": (["train.weight_decay=inf"], ["train.weight_decay", "finite"]),
    "weight_decay_unstable": (["train.lr=0.5", "train.weight_decay=5"], ["train.weight_decay", "< 2"]),
    "server_lr_inf": (["strategy.server_lr=inf"], ["strategy.server_lr", "finite"]),
    "fiht_measurements_0": (["strategy.name=fiht_cs", "strategy.measurements=0"], ["strategy.measurements", ">= 1"]),
    "fiht_sparsity_0": (["strategy.name=fiht_cs", "strategy.sparsity=0"], ["strategy.sparsity", ">= 1"]),
    "fiht_compression_abc": (["strategy.name=fiht_cs", "strategy.compression=abc"], ["strategy.compression", "number"]),
    "log_level_bogus": (["simulation.log_level=bogus"], ["simulation.log_level", "WARNING"]),
    "seed_2_70": ([f"seed={2**70}"], ["seed", "2**63"]),
    "snr_db_abc": (["strategy.name=rlc", "channel.snr_db=abc"], ["channel.snr_db", "number"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_one_line(case, tmp_path, monkeypatch):
    import fl_sim.engine.memory

    real = fl_sim.engine.memory.available_bytes()
    assert real is None or real > 0
    # the size cases need 89 GiB and more: as on a 16 GiB machine, whatever this one has
    monkeypatch.setattr(fl_sim.engine.memory, "available_bytes", lambda: min(real or 2**34, 2**34))
    sets, words = BAD_VALUES[case]
    args = ["run", *SMALL] + [x for s in sets for x in ("--set", s)] + ["--out", str(tmp_path / "o")]
    _one_line_error(runner.invoke(app, args), *words)


def test_diverged_model_stops_the_run():
    """A global model that became inf/NaN (model.pt all NaN before) stops the run with one line."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fl_sim.runs.build import build_experiment
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import server_loop

    exp = build_experiment(load_config(None, [s for s in SMALL if s != "--set"]))

    class Diverging:  # Flower's Strategy.start as it calls evaluate_fn after each round
        last_metrics: dict = {}

        def start(self, grid, initial_arrays, num_rounds, evaluate_fn):
            evaluate_fn(0, initial_arrays)
            nan = ArrayRecord({k: Array(np.full_like(a.numpy(), np.nan)) for k, a in initial_arrays.items()})
            evaluate_fn(1, nan)

    with pytest.raises(ValueError, match=r"round 1: the global model diverged .* train.lr="):
        server_loop(None, exp, Diverging(), None)


def test_bad_files_one_line(tmp_path):
    """Bad files: duplicate YAML keys, non-UTF-8 YAML, MNIST labels outside 0..9, corrupt
    metrics.csv / summary.json in report; bad outputs: --out that is a file, a full disk."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("rounds: 2\ntrain:\n  lr: 0.1\n  lr: 5\n")
    _one_line_error(runner.invoke(app, ["run", str(dup)]), "dup.yaml", "line 4", "'lr'", "twice")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    _one_line_error(runner.invoke(app, ["run", str(latin)]), "latin.yaml", "UTF-8")
    _mnist_with_label(tmp_path / "data", 200)
    res = runner.invoke(app, ["run", *SMALL, "--set", "data.name=mnist", "--set", f"data.root={tmp_path / 'data'}",
                              "--out", str(tmp_path / "m")])
    _one_line_error(res, "labels", "200", "0..9")
    good = tmp_path / "good"
    assert runner.invoke(app, ["run", *SMALL, "--out", str(good)]).exit_code == 0
    (good / "summary.json").write_text("{not json")
    _one_line_error(runner.invoke(app, ["report", str(good), "--out", str(tmp_path / "rep")]), "summary.json", "JSON")
    (good / "metrics.csv").write_bytes(b"round,test_accuracy\n1,abc\n")
    _one_line_error(runner.invoke(app, ["report", str(good), "--out", str(tmp_path / "rep")]), "metrics.csv")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _one_line_error(runner.invoke(app, ["run", *SMALL, "--out", str(a_file)]), str(a_file), "not a directory")


def test_disk_full_names_the_path(tmp_path, monkeypatch):
    import errno
    import os as _os

    import fl_sim.runs.results

    real = _os.replace

    def full(src, dst):
        if str(dst).endswith("metrics.csv"):
            raise OSError(errno.ENOSPC, _os.strerror(errno.ENOSPC))  # as a write on a full disk: no file name
        return real(src, dst)

    monkeypatch.setattr(fl_sim.runs.results.os, "replace", full)
    res = runner.invoke(app, ["run", *SMALL, "--out", str(tmp_path / "o")])
    _one_line_error(res, str(tmp_path / "o" / "metrics.csv"), "No space left")


def test_typer_shows_no_locals():
    assert app.pretty_exceptions_show_locals is False


@pytest.mark.parametrize("name, params", [("count_sketch", {}), ("cs_fiht", {"measurements": 50}),
                                          ("onebit_cs", {"measurements": 50})])
def test_codec_rejects_overflow_at_encode(name, params):
    """A finite x whose measurements overflow float32 is refused by encode, not at decode."""
    import torch

    from fl_sim.compression.base import CodecError, make_codec

    codec = make_codec(name, dim=200, **params)
    with pytest.raises(CodecError, match=f"{name}.encode"):
        codec.encode(torch.full((200,), 3e38), seed=1)
    codec.decode(codec.encode(torch.full((200,), 1e3), seed=1), seed=1)  # ordinary input still works


ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, timeout=60):
    """fl-sim in a subprocess (from this checkout), bounded: a hang fails the test instead of blocking it."""
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", "from fl_sim.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("sets, words", [
    (["simulation.num_cpus=100"], ["simulation.num_cpus=100", "CPUs"]),  # waited forever for nodes
    (["simulation.ray_address=127.0.0.1:1"], ["simulation.ray_address", "127.0.0.1:1"]),  # retried forever
])
def test_engine_waits_are_bounded(sets, words, tmp_path):
    """Engine waits that cannot end are refused before Ray starts, within seconds, one line."""
    args = ["run", "--set", "rounds=1", "--set", "simulation.backend=ray", "--out", str(tmp_path / "o")]
    p = _cli(*args, *[x for s in sets for x in ("--set", s)])
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), p.stderr


def test_ctrl_c_exits_despite_a_waiting_thread(tmp_path):
    """Ctrl-C while Flower's ServerApp thread (not a daemon) waits for replies used to keep
    the process alive; main() now leaves at once with exit code 130."""
    import os
    import signal
    import time

    script = ("import threading, time, fl_sim.cli as c\n"
              "def waiting_serverapp(): time.sleep(600)\n"
              "def app():\n"
              "    threading.Thread(target=waiting_serverapp).start()\n"
              "    print('ready', flush=True); time.sleep(600)\n"
              "c.app = app\nc.main()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = p.wait(timeout=30)
        assert rc == 130 and time.monotonic() - t0 < 30
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
