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


def test_run_that_never_aggregates_exits_1(tmp_path, monkeypatch):
    """Issue 14 item 6: with the ClientApp's compression_mod gone, every reply of a compressed method is
    rejected; the run used to exit 0 (and save the initial model). Now: one error line, exit code 1,
    no model.pt."""
    import fl_sim.clients.app as client_app

    monkeypatch.setattr(client_app, "compression_mod", lambda msg, ctx, call_next: call_next(msg, ctx))
    res = runner.invoke(app, ["run", "configs/topk_ef.yaml", *SMALL, "--out", str(tmp_path / "r")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "no round aggregated" in res.output
    assert not (tmp_path / "r" / "model.pt").exists()
