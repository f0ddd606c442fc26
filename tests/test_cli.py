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

    from fl_sim.build import build_experiment
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


def _one_line_error(res, *words):
    """Exit 2, no traceback, the error on one line (the last) that names every word."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:"), res.output
    for w in words:
        assert w in last, (w, res.output)


def test_run_refuses_an_occupied_dir(tmp_path):
    """Issue 16 item 1: a second `run --out DIR` on a finished run no longer replaces it silently."""
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
    """Issue 16 item 1: while one run holds DIR/.lock, another run on DIR fails at once with one line."""
    import fcntl

    d = tmp_path / "r"
    d.mkdir()
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        res = runner.invoke(app, ["run", *SMALL, "--out", str(d)])
    _one_line_error(res, "another fl-sim run", str(d))
    assert not (d / "config.yaml").exists()


def test_sweep_reruns_points_whose_config_changed(tmp_path):
    """Issue 16 item 2: changed fixed settings are not 'done'; unchanged engine settings are."""
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
    """Issue 16 item 3: hf:/a/b.parquet and hf:/a_b.parquet used to share one directory."""
    from fl_sim.sweep import _point_name, run_sweep

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
