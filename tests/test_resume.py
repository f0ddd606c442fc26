"""``fl-sim run --resume``: a run stopped after round 5 and resumed from its round-4 checkpoint writes the
same metrics.csv as a run that was never stopped (every column but the timings wall_s and round_s).

Stopping: an exception raised by the progress callback (fast, in-process) for each method, and one real
SIGKILL of a subprocess. Each comparison has a control showing the test can fail: resuming with the
server state or the client residuals dropped changes the metrics.
"""

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fl_sim.runs.checkpoint import latest_checkpoint
from fl_sim.cli import app
from fl_sim.clients.residuals import DiskResidualStore
from fl_sim.config import load_config
from fl_sim.runs.simulation import run_experiment
from fl_sim.strategies.base import UpdateStrategy

TIMINGS = ("wall_s", "round_s")
TINY = ["rounds=6", "checkpoint_every=2", "simulation.backend=inline", "clients=20", "clients_per_round=4",
        "model.hidden=[16]"]
RLC_REMARK6 = ["strategy.name=rlc", "strategy.variant=remark6", "strategy.gain=5", "strategy.c_gain=3",
               "channel.snr_db=10", "channel.fading=rayleigh", "channel.participation=0.8",
               "channel.downlink_snr_db=20"]
# (config, extra overrides, what the resumed run depends on)
CASES = {
    "topk_ef": ("topk_ef", []),  # client residuals (disk store)
    "fetchsgd": ("fetchsgd", ["strategy.k=100"]),  # momentum and error sketches (k < d: they keep mass)
    "fedsgd": ("fedsgd", []),  # server momentum
    "fiht_cs": ("fiht_cs", []),  # server error Φe
    "daqusgd": ("daqusgd", ["strategy.epoch_rounds=2"]),  # threshold sums and momentum
    "qcs": ("qcs", ["simulation.residual_budget_mb=0.01"]),  # weighted EF residuals, in-memory tier on
    "rlc_remark6": ("quickstart", RLC_REMARK6),  # channel memory, last broadcast, client residuals
}


class Stop(Exception):
    pass


def stop_after(n):
    def progress(rnd, row):
        if rnd == n:
            raise Stop(f"stopped after round {n}")

    return progress


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


def config(name: str, extra=()):
    base, more = CASES[name]
    return load_config(f"configs/{base}.yaml", TINY + more + list(extra))


@pytest.mark.parametrize("name", list(CASES))
def test_stopped_and_resumed_equals_uninterrupted(name, tmp_path):
    cfg = config(name)
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(5))
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None and ckpt.round == 4 and len(ckpt.rows) == 5
    assert len(metrics(tmp_path / "cut")) == 6  # rounds 0..5 on disk: round 5 must be redone
    summary = run_experiment(cfg, tmp_path / "cut", resume=True)
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert len(full) == 7 and resumed == full
    assert summary["rounds"] == 6
    assert not (tmp_path / "cut" / "checkpoint").exists() and not (tmp_path / "cut" / "state").exists()


def _drop_state(monkeypatch):
    monkeypatch.setattr(UpdateStrategy, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(DiskResidualStore, "restore", lambda self, ids, rows: 0)  # the store was just emptied


@pytest.mark.parametrize("name", ["topk_ef", "fetchsgd", "fedsgd"])
def test_control_resume_without_state_differs(name, tmp_path, monkeypatch):
    cfg = config(name)
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(5))
    _drop_state(monkeypatch)
    run_experiment(cfg, tmp_path / "cut", resume=True)
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert resumed[:5] == full[:5] and resumed[5:] != full[5:]


def test_checkpoint_holds_the_state(tmp_path):
    cfg = config("rlc_remark6")
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(5))
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.strategy_class == "RLCOverTheAir"
    assert ckpt.strategy["_memory"], "c_gain=3 clips some node: its channel memory must be checkpointed"
    assert ckpt.strategy["_broadcast"] is not None and ckpt.residuals is not None
    ids = __import__("numpy").load(ckpt.residuals[0])
    assert 4 <= len(ids) <= 16  # 4 rounds x 4 sampled clients (repeats possible), all with residuals
    assert [r["round"] for r in ckpt.rows] == [0, 1, 2, 3, 4]


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import run_experiment

    cfg = load_config("configs/topk_ef.yaml", sys.argv[2:])

    def progress(rnd, row):
        if rnd == 5:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks: as kill -9

    run_experiment(cfg, sys.argv[1], progress)
    """
)


def test_sigkill_then_cli_resume(tmp_path):
    """A real SIGKILL after round 5 (checkpoint of round 4 on disk), resumed with `fl-sim run --resume`."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "cut"), *TINY],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "cut").round == 4
    res = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "cut")])
    assert res.exit_code == 0, res.output
    run_experiment(load_config("configs/topk_ef.yaml", TINY), tmp_path / "full")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_cli_resume_refusals(tmp_path):
    class Runner(CliRunner):  # rich wraps the one-line error at 80 columns: join it back
        def invoke(self, *args, **kw):
            res = super().invoke(*args, **kw)
            return type("R", (), {"exit_code": res.exit_code, "output": " ".join(res.output.split())})

    runner = Runner()
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "config.yaml" in res.output and "Traceback" not in res.output
    cfg = config("fedsgd")
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "early", stop_after(1))  # before the first checkpoint
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "early")])
    assert res.exit_code == 2 and "no checkpoint" in res.output, res.output
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(3))
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "cut"), "--set", "train.lr=0.2"])
    assert res.exit_code == 2 and "train.lr" in res.output and "differs" in res.output, res.output
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "cut"), "--out", str(tmp_path / "elsewhere")])
    assert res.exit_code == 2 and "--out" in res.output, res.output
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "cut"), "--set", "simulation.log_level=ERROR"])
    assert res.exit_code == 0, res.output  # engine settings may change
    res = runner.invoke(app, ["run", "--resume", str(tmp_path / "cut")])
    assert res.exit_code == 2 and "already finished" in res.output, res.output


def test_context_store_cannot_be_checkpointed(tmp_path):
    cfg = config("topk_ef", ["simulation.residual_store=context"])
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        run_experiment(cfg, tmp_path / "ctx")


def test_start_round_bounds():
    """Resume goes through server_loop's start_round (the strategy's round_offset); the loop is Flower's
    Strategy.start (or the inner strategy's own start), never a fork of it in fl-sim."""
    import inspect

    from fl_sim.runs.build import build_experiment
    from fl_sim.runs.simulation import server_loop

    assert "send_and_receive" not in inspect.getsource(UpdateStrategy)
    exp = build_experiment(config("topk_ef", ["rounds=3"]))
    with pytest.raises(ValueError, match="start_round"):
        server_loop(None, exp, UpdateStrategy(), None, start_round=5)


@pytest.mark.e2e
def test_inline_run_resumed_on_ray(tmp_path):
    """The resumed part on Flower's Ray engine: start_round through the ServerApp, residual rows restored
    by the driver and read by Ray workers (an in-memory tier on). About 15 s, most of it Ray's start."""
    cfg = config("topk_ef")
    run_experiment(cfg, tmp_path / "full")
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(5))
    ray_cfg = config("topk_ef", ["simulation.backend=ray", "simulation.residual_budget_mb=1"])
    run_experiment(ray_cfg, tmp_path / "cut", resume=True)  # engine keys may differ from the checkpoint's
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_kill_before_summary_leaves_a_resumable_run(tmp_path, monkeypatch):
    """Killed after the final model but before summary.json, the run must still resume
    (the checkpoint used to be deleted first, leaving a run that was neither finished nor resumable)."""
    from fl_sim.runs.results import RunRecorder

    cfg = config("fedsgd")
    finish = RunRecorder.finish

    def killed(self, extra):
        raise Stop("killed before summary.json")

    monkeypatch.setattr(RunRecorder, "finish", killed)
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut")
    monkeypatch.setattr(RunRecorder, "finish", finish)
    summary = run_experiment(cfg, tmp_path / "cut", resume=True)
    run_experiment(cfg, tmp_path / "full")
    assert summary["rounds"] == 6 and metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def _cut(tmp_path, name="fedsgd"):
    cfg = config(name)
    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", stop_after(5))
    return cfg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan"])
def test_damaged_newest_checkpoint_falls_back(damage, tmp_path, caplog):
    """The previous checkpoint is kept; a corrupt, truncated or non-finite newest one
    is skipped with a warning and the run resumes from round 2 with the same results."""
    import torch

    cfg = _cut(tmp_path)
    newest = tmp_path / "cut" / "checkpoint" / "round-000004.pt"
    assert (tmp_path / "cut" / "checkpoint" / "round-000002.pt").is_file()
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        state = torch.load(newest, weights_only=True)
        state["arrays"][0][1].fill_(float("nan"))
        torch.save(state, newest)
    with caplog.at_level("WARNING", logger="fl_sim"):
        ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.round == 2 and "round-000004.pt" in caplog.text and "falling back" in caplog.text
    run_experiment(cfg, tmp_path / "cut", resume=True)
    run_experiment(cfg, tmp_path / "full")
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_every_checkpoint_damaged_is_one_line(tmp_path):
    _cut(tmp_path)
    for p in (tmp_path / "cut" / "checkpoint").glob("round-*.pt"):
        p.write_bytes(b"junk")
    res = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "cut")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "round-000004.pt" in last and "damaged" in last, res.output


def test_stale_temporaries_removed_and_modes(tmp_path):
    """The .tmp files a kill left in checkpoint/ go; model.pt is 0644 like the other files."""
    cfg = _cut(tmp_path)
    stale = tmp_path / "cut" / "checkpoint" / ".round-000006.abc.tmp"
    stale.write_bytes(b"half")
    (tmp_path / "cut" / ".metrics.csv.x.tmp").write_text("half")
    old = os.umask(0o022)
    try:
        run_experiment(cfg, tmp_path / "cut", resume=True)
    finally:
        os.umask(old)
    assert not [p for p in (tmp_path / "cut").rglob("*.tmp")]
    assert (tmp_path / "cut" / "model.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "cut" / "summary.json").stat().st_mode & 0o777 == 0o644
