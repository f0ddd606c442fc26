"""Checkpoint integrity: a SHA-256 manifest per checkpoint, verified on resume, with fallback to the older one.

A run is cut after round 5 (checkpoints of rounds 2 and 4 on disk) once per config; each test damages a
copy of it. Damage that ``torch.load`` and the residual store's own checks do not see (a flipped byte in
a tensor, a shortened or garbled residual snapshot) used to resume from the damaged checkpoint, with
wrong numbers or an exit 2 although round 2's checkpoint was intact; a 0-byte .pt raised an IndexError.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fl_sim.runs.checkpoint import latest_checkpoint
from fl_sim.cli import app
from fl_sim.runs.simulation import run_experiment
from test_resume import Stop, config, metrics, stop_after


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config name: (cfg, directory of a run cut after round 5, directory of the uninterrupted run)}."""
    base = tmp_path_factory.mktemp("integrity")
    out = {}
    for name in ("fedsgd", "topk_ef"):  # server state only; client residuals in the disk store
        cfg = config(name)
        with pytest.raises(Stop):
            run_experiment(cfg, base / f"{name}-cut", stop_after(5))
        run_experiment(cfg, base / f"{name}-full")
        out[name] = (cfg, base / f"{name}-cut", base / f"{name}-full")
    return out


def cut_copy(runs, name, tmp_path) -> tuple[object, Path, Path]:
    cfg, cut, full = runs[name]
    shutil.copytree(cut, tmp_path / "cut")
    return cfg, tmp_path / "cut", full


def flip_tensor_byte(pt: Path) -> None:
    """Flip one byte inside the model's first tensor as stored in the .pt (torch.load still succeeds)."""
    data = bytearray(pt.read_bytes())
    tensor = torch.load(pt, weights_only=True)["arrays"][0][1]
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + tensor.numel() * tensor.element_size() // 2] ^= 0x40
    pt.write_bytes(bytes(data))
    assert torch.load(pt, weights_only=True)["round"] == 4  # readable: only the checksum can tell


DAMAGE = {
    "0-byte .pt": ("fedsgd", lambda d: (d / "round-000004.pt").write_bytes(b"")),
    "flipped byte in .pt": ("fedsgd", lambda d: flip_tensor_byte(d / "round-000004.pt")),
    "truncated residual rows": ("topk_ef", lambda d: (d / "residuals-000004.rows").write_bytes(
        (d / "residuals-000004.rows").read_bytes()[:-100])),
    "garbage residual ids": ("topk_ef", lambda d: (d / "residuals-000004.ids.npy").write_bytes(b"\x93NUMPY junk")),
    "no manifest (killed before it)": ("fedsgd", lambda d: (d / "round-000004.sha256").unlink()),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_newest_falls_back_to_the_older(case, runs, tmp_path, caplog):
    name, damage = DAMAGE[case]
    cfg, cut, full = cut_copy(runs, name, tmp_path)
    damage(cut / "checkpoint")
    with caplog.at_level("WARNING", logger="fl_sim"):
        ckpt = latest_checkpoint(cut)
    assert ckpt.round == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "round-000004.pt" in warnings[0] and "falling back to round-000002.pt" in warnings[0]
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("case", ["flipped byte in .pt", "truncated residual rows"])
def test_resume_after_damage_gives_the_uninterrupted_numbers(case, runs, tmp_path):
    name, damage = DAMAGE[case]
    cfg, cut, full = cut_copy(runs, name, tmp_path)
    damage(cut / "checkpoint")
    run_experiment(cfg, cut, resume=True)
    assert metrics(cut) == metrics(full)


def test_cli_resume_from_a_0_byte_newest(runs, tmp_path):
    _, cut, full = cut_copy(runs, "fedsgd", tmp_path)
    (cut / "checkpoint" / "round-000004.pt").write_bytes(b"")
    res = CliRunner().invoke(app, ["run", "--resume", str(cut)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert metrics(cut) == metrics(full)


def test_every_checkpoint_damaged_is_one_line_exit_2(runs, tmp_path):
    _, cut, _ = cut_copy(runs, "topk_ef", tmp_path)
    for p in (cut / "checkpoint").glob("residuals-*.rows"):
        p.write_bytes(b"")
    res = CliRunner().invoke(app, ["run", "--resume", str(cut)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    last = " ".join(res.output[res.output.index("error:"):].split())  # rich wraps the one line at 80 columns
    assert "error:" not in last[1:] and "round-000004.pt" in last and "residuals-000004.rows" in last, res.output
    assert "SHA-256" in last and "1 older checkpoint(s) unusable" in last


def test_manifest_is_sha256sum_of_every_file(runs):
    """round-NNNNNN.sha256 lists the .pt and the residual snapshot in ``sha256sum -c`` format."""
    d = runs["topk_ef"][1] / "checkpoint"
    for r in (2, 4):
        lines = (d / f"round-{r:06d}.sha256").read_text().splitlines()
        names = {f"round-{r:06d}.pt", f"residuals-{r:06d}.ids.npy", f"residuals-{r:06d}.rows"}
        assert {line.split("  ")[1] for line in lines} == names
        for line in lines:
            digest, name = line.split("  ")
            assert digest == hashlib.sha256((d / name).read_bytes()).hexdigest()


def test_checkpoints_without_manifests_load_unverified(runs, tmp_path, caplog):
    """A run directory from before manifests (none at all) still resumes, with a warning."""
    _, cut, _ = cut_copy(runs, "fedsgd", tmp_path)
    for p in (cut / "checkpoint").glob("*.sha256"):
        p.unlink()
    with caplog.at_level("WARNING", logger="fl_sim"):
        ckpt = latest_checkpoint(cut)
    assert ckpt.round == 4 and "unverified" in caplog.text
