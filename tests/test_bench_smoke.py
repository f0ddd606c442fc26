"""Every benchmark runs end to end at tiny sizes, so none can rot: ``fl-sim bench <name> --smoke --out FILE``.

Each smoke test runs one benchmark through the CLI (which calls ``fl_sim.bench.<module>.main(argv)``) and
checks the JSON it writes: its structure, and that every figure is a finite number. Timings are only
checked to be finite and non-negative (speed claims belong to the benchmarks' own output, not to tests).
``round``, ``scale`` and ``memory-flat`` measure in child processes (``python -m fl_sim.bench.<module>
--worker``), so their smoke tests also run that path, with this checkout first on the child's path.
``ray-profile`` needs a Ray cluster for its profile: its smoke run is the poll micro-benchmark, and its
pure aggregation functions are checked here on synthetic snapshots and a synthetic py-spy file.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from fl_sim import cli
from fl_sim.compression import codec_names

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "fl_sim" / "bench"
runner = CliRunner()


def _non_finite(x: Any, path: str = "") -> list[str]:
    """Paths of the numbers in a JSON document that are NaN or infinite."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return []
    if isinstance(x, (int, float)):
        return [] if math.isfinite(x) else [path]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _non_finite(v, f"{path}.{k}")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in _non_finite(v, f"{path}[{i}]")]
    raise TypeError(f"{path}: {type(x).__name__} in the benchmark's JSON")


def bench(tmp_path: Path, name: str, *args: str, out: str = "out.json") -> Any:
    """Run ``fl-sim bench NAME --smoke --out tmp/OUT ARGS``; the JSON it wrote."""
    path = tmp_path / out
    result = runner.invoke(cli.app, ["bench", name, "--smoke", "--out", str(path), *args])
    assert result.exit_code == 0, f"fl-sim bench {name} --smoke failed:\n{result.output}\n{result.exception!r}"
    return json.loads(path.read_text())


def assert_finite(data: Any, *, skip: tuple[str, ...] = ()) -> None:
    bad = [p for p in _non_finite(data) if not any(s in p for s in skip)]
    assert not bad, f"non-finite figures: {bad[:10]}"


@pytest.fixture
def child_path(monkeypatch):
    """Children started by a benchmark import this checkout (an installed fl-sim may be another one)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


# ------------------------------------------------------------------ every module is a `fl-sim bench` command
class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.ns = ns


def _stop_after_parsing(monkeypatch) -> None:
    """parse_args parses strictly, then stops main() with the namespace (nothing is measured)."""

    def parse_args(self, args=None, namespace=None):
        ns, extra = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        assert not extra, f"{self.prog}: unknown arguments {extra}"
        raise _Parsed(ns)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def _bench_modules() -> set[str]:
    return {p.stem for p in BENCH.glob("*.py") if p.stem != "__init__"}


def _commands() -> list[str]:
    return [c.name for c in cli.bench_app.registered_commands]


@pytest.mark.parametrize("name", sorted(_bench_modules()))
def test_every_benchmark_module_has_main_and_runs_as_a_module(name):
    tree = ast.parse((BENCH / f"{name}.py").read_text(encoding="utf-8"))
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains and mains[0].args.args and mains[0].args.args[0].arg == "argv", f"{name}: no main(argv)"
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guards, f"{name}: no `if __name__ == '__main__'` (python -m fl_sim.bench.{name})"


def test_every_benchmark_is_a_cli_command_whose_defaults_are_the_modules(monkeypatch):
    """`fl-sim bench <cmd>` with no options passes its module exactly the module's own defaults, and every
    module in fl_sim/bench is reached by one command."""
    _stop_after_parsing(monkeypatch)
    called: dict[str, str] = {}
    real = cli._bench_module

    def recording(name: str):
        mod = real(name)
        called[cmd] = name
        return mod

    monkeypatch.setattr(cli, "_bench_module", recording)
    for cmd in _commands():
        result = runner.invoke(cli.app, ["bench", cmd])
        assert isinstance(result.exception, _Parsed), f"fl-sim bench {cmd}: {result.output}\n{result.exception!r}"
        with pytest.raises(_Parsed) as own:
            real(called[cmd]).main([] if called[cmd] != "plain_loop" else ["quickstart"])
        assert vars(result.exception.ns) == vars(own.value.ns), f"fl-sim bench {cmd} defaults differ from {called[cmd]}'s"
    assert set(called.values()) == _bench_modules()
    assert len(called) == len(set(called.values())) == len(_commands())


def test_a_benchmark_user_error_is_one_line_and_exit_code_2(tmp_path):
    result = runner.invoke(cli.app, ["bench", "plain-loop", "qsgd", "--smoke", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2
    assert "plain loop runs FedAvg" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.json").exists()
    debug = runner.invoke(cli.app, ["bench", "--debug", "plain-loop", "qsgd", "--smoke", "--out", str(tmp_path / "x.json")])
    assert isinstance(debug.exception, ValueError)  # --debug: the exception itself, for a bug report


# ------------------------------------------------------------------ kernels: codecs, transforms, recovery
def test_codecs_smoke(tmp_path):
    """Every registered codec at d = 2^10, and the transforms and recovery benchmarks it includes."""
    data = bench(tmp_path, "codecs")
    assert isinstance(data["transforms"], list) and isinstance(data["recovery"], list), \
        (data["transforms"], data["recovery"])  # an error there is reported as a dict, not raised
    rows = {r["codec"]: r for r in data["codecs"]}
    assert set(rows) == set(codec_names()) and data["smoke"] is True
    for name, r in rows.items():
        assert "error" not in r and "skipped" not in r, f"{name}: {r}"
        assert r["d"] == 2**10 and r["bits"] > 0 and r["encode_ms"] >= 0 and r["decode_ms"] >= 0
    assert rows["identity"]["rel_error"] == 0.0 and rows["identity"]["bits"] == 32 * 2**10
    assert 0 < rows["topk"]["rel_error"] < 1  # keeps the 1 % largest: loses part of the energy, not all
    assert_finite(data)


def test_transforms_smoke(tmp_path):
    rows = bench(tmp_path, "transforms")
    assert {r["bench"] for r in rows} == {"fwht_vs_rfft", "dct", "idct", "operator"}
    assert [r["n"] for r in rows if r["bench"] == "fwht_vs_rfft"] == [2**10, 1024]
    assert all(r["time_ms"] >= 0 for r in rows) and sum(r["bench"] == "operator" for r in rows) == 4
    assert_finite(rows)


def test_recovery_smoke(tmp_path):
    data = bench(tmp_path, "recovery")
    names = [r["name"] for r in data["rows"]]
    assert names[:4] == ["count_sketch.build_hashes", "count_sketch.sketch", "count_sketch.estimate",
                         "count_sketch.unsketch_topk"]
    assert {f"fiht.{t}.d/Q={q}" for t in ("dct", "wht") for q in (2, 5, 10)} < set(names)
    fiht = [r for r in data["rows"] if r["name"].startswith("fiht")]
    assert all(r["d"] == 668 and r["iterations"] >= 1 and r["rel_error"] >= 0 for r in fiht)
    assert_finite(data)


# ------------------------------------------------------------------ codec fidelity
def test_fidelity_smoke_finds_its_config_and_never_draws_from_the_global_generator(tmp_path, monkeypatch):
    """The shipped config is found from any directory, and the global torch generator is untouched
    (every draw seeded: two runs print the same table)."""
    monkeypatch.chdir(tmp_path)
    state = torch.get_rng_state()
    data = bench(tmp_path, "fidelity")
    assert torch.equal(torch.get_rng_state(), state), "a draw from torch's global generator"
    ru = data["real_update"]
    assert ru["d"] == sum(ru["tensors"]) and len(ru["rows"]) == 12
    assert all(r["rel_mse"] > 0 and r["bits"] > 0 for r in ru["rows"])
    for r in data["qsgd_bits"]["rows"]:  # Elias codes the levels in fewer bits than 32 + d(1 + log2(s+1))
        assert r["elias"] < r["fixed"] == 32 + 256 * (1 + math.ceil(math.log2(r["levels"] + 1)))
    tern = {r["clip_sigma"]: r["rel_mse"] for r in data["terngrad_student_t"]["rows"]}
    assert set(tern) == {None, 2.5}
    assert_finite(data)
    again = bench(tmp_path, "fidelity", out="again.json")
    assert again["terngrad_student_t"] == data["terngrad_student_t"]


def test_student_t_draws_follow_students_t():
    """student_t(d, 3, g) against scipy's t(3) CDF: Kolmogorov-Smirnov at n = 20,000 with a fixed seed.
    Under the right law the p-value is uniform on [0, 1]; with the seed fixed the test is deterministic,
    and a wrong law (e.g. chi-square not divided by nu: t scaled by sqrt(3)) gives D ~ 0.1, p ~ 1e-150."""
    from fl_sim.bench.bench_codec_fidelity import student_t
    from fl_sim.rng import torch_generator

    x = student_t(20_000, 3, torch_generator(0, "test-student-t")).double().numpy()
    assert stats.kstest(x, stats.t(3).cdf).pvalue > 0.01
    assert stats.kstest(x * np.sqrt(3), stats.t(3).cdf).pvalue < 1e-6  # the check can fail
    assert torch.equal(student_t(50, 3, torch_generator(1)), student_t(50, 3, torch_generator(1)))


# ------------------------------------------------------------------ client encoding, FIHT vs sketch
def test_encoding_smoke(tmp_path):
    data = bench(tmp_path, "encoding")
    points = data["points"]
    assert [(p["method"], p["per_round"], p["store"]) for p in points] == [("topk_ef", 3, "disk"),
                                                                          ("topk_ef", 3, "context")]
    assert all(p["per-reply"] > 0 and p["block"] > 0 and p["ratio"] > 0 for p in points)
    assert_finite(data)


def test_fiht_vs_sketch_smoke(tmp_path):
    rows = bench(tmp_path, "fiht-vs-sketch")
    assert len(rows) == 16 and {r["stream"] for r in rows} == {"dense", "sparse"}
    assert {(r["decoder"], r["rule"]) for r in rows} == {("fiht", "subtract"), ("fiht", "none"), ("sketch", "zero"),
                                                        ("sketch", "subtract"), ("sketch", "none")}
    sp = {r["stream"]: r["sp"] for r in rows}
    assert sp["sparse"] < sp["dense"]  # the two streams are what their names say
    assert all(r["err_T"] >= 0 and -1 - 1e-6 <= r["cos_T"] <= 1 + 1e-6 for r in rows)
    assert_finite(rows)


# ------------------------------------------------------------------ runs: plain loop, round, scale, memory
def test_plain_loop_smoke(tmp_path):
    data = bench(tmp_path, "plain-loop")
    assert [r["round"] for r in data["rows"]] == [0, 1, 2] and data["per_round"] == 2
    assert 0 <= data["final_test_accuracy"] <= 1 and data["final_test_loss"] > 0
    assert_finite(data)


def test_round_smoke_plain_and_inline_compute_the_same(tmp_path, child_path):
    data = bench(tmp_path, "round")
    runs = {r["spec"]["mode"]: r for r in data["runs"]}
    assert set(runs) == {"plain", "inline"}, [r.get("error") for r in data["runs"]]
    assert all("error" not in r and len(r["round_s"]) == 3 for r in runs.values())
    # the same clients, data, sampling and steps: the same model up to float32 rounding
    assert runs["plain"]["final_test_loss"] == pytest.approx(runs["inline"]["final_test_loss"], rel=1e-4)
    summary = {r["mode"]: r for r in data["summary"]}
    assert summary["plain"]["ratio_to_plain"] == pytest.approx(1.0)
    assert_finite(data)


def test_scale_smoke(tmp_path, child_path):
    data = bench(tmp_path, "scale", "--data-root", str(tmp_path / "data"), "--plot", str(tmp_path / "scale.png"))
    res = data["curve-inline-nodes=clients-4"]
    assert "error" not in res, res.get("error")
    assert res["clients"] == 4 and res["per_round"] == 2 and [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(r["replies"] == 2 and r["round_s"] > 0 for r in res["rounds"])
    assert res["memory_peak"]["peak_rss_gib"] > 0 and (tmp_path / "scale.png").stat().st_size > 0
    assert_finite(res)


def test_memory_flat_smoke(tmp_path, child_path):
    data = bench(tmp_path, "memory-flat", "--plot", str(tmp_path / "memory.png"))
    res = data["inline"]
    assert [r["round"] for r in res["rows"]] == [0, 1, 2, 3] and res["clients"] == 4
    assert all(0 < r["pss"] <= r["rss"] <= r["peak_rss"] for r in res["rows"])
    assert "_machine" in data and (tmp_path / "memory.png").stat().st_size > 0
    assert_finite(res)


# ------------------------------------------------------------------ ray profile: what runs without Ray
def test_ray_profile_smoke_runs_the_poll_micro_benchmark(tmp_path):
    rows = bench(tmp_path, "ray-profile")
    assert len(rows) == 1 and rows[0]["nodes"] == 10 and rows[0]["messages"] == 10
    assert rows[0]["flower returned"] == rows[0]["fl-sim returned"] == 10  # both deliver every message once
    assert rows[0]["flower"] >= 0 and rows[0]["fl-sim"] >= 0
    assert_finite(rows)


def test_ray_profile_aggregation_on_synthetic_snapshots(tmp_path):
    """The profile's arithmetic (Ray-free): CPU deltas per role, per thread and per actor between two
    snapshots; py-spy's raw stacks collapsed into shares; the report's lines."""
    from fl_sim.bench.ray_profile import _collapse, _deltas, report, snapshot

    a = {1: {"role": "driver", "cpu_s": 1.0, "threads": {"main": 1.0}},
         2: {"role": "actor", "cpu_s": 2.0, "threads": {"ray::ClientAppActor": 2.0}}}
    b = {1: {"role": "driver", "cpu_s": 1.5, "threads": {"main": 1.25, "poll": 0.25}},
         2: {"role": "actor", "cpu_s": 3.0, "threads": {"ray::ClientAppActor": 3.0}},
         3: {"role": "actor", "cpu_s": 0.5, "threads": {"ray::ClientAppActor": 0.5}}}  # started in between
    by_role, threads, per_actor = _deltas(a, b)
    assert by_role == {"driver": 0.5, "actor": 1.5} and per_actor == {2: 1.0, 3: 0.5}
    assert threads == {"driver": {"main": 0.25, "poll": 0.25}, "actor": {"ray::ClientAppActor": 1.5}}

    raw = tmp_path / "spy.txt"
    raw.write_text("MainThread;f;g 6\nMainThread;f;h 2\nworker;f 2\n")
    c = _collapse(str(raw))
    assert c["samples"] == 10 and c["threads"] == {"MainThread": 0.8, "worker": 0.2}
    assert c["inclusive_frames"]["f"] == 1.0 and c["inclusive_frames"]["g"] == 0.6
    assert _collapse(str(tmp_path / "missing.txt")) == {}

    rounds = [{"round": r, "round_s": 0.5, "replies": 2, "app_cpu_s": 0.5, "by_role": by_role, "threads": threads,
               "per_actor": per_actor} for r in (1, 2, 3)]
    lines: list[str] = []
    report({"spec": {"workload": "synthetic"}, "final_test_loss": 1.0, "loadavg": (0.0,), "rounds": rounds},
           log=lines.append)
    total = next(line for line in lines if line.strip().startswith("total"))
    assert total.split()[1:] == ["2.000", "1000.00"]  # 2 CPU s a round over 2 replies
    outside = next(line for line in lines if "actors outside them" in line)
    assert outside.split()[-2:] == ["1.000", "500.00"]

    me = snapshot(os.getpid())  # this process as the driver: its own CPU and named threads
    assert me[os.getpid()]["role"] == "driver" and me[os.getpid()]["cpu_s"] > 0


# ------------------------------------------------------------------ per-message costs; the pfl peer
def test_messages_smoke(tmp_path):
    data = bench(tmp_path, "messages")
    owners = {r["owner"] for r in data["steps"]}
    assert owners == {"fl-sim", "Flower", "(was)"} and data["smoke"] is True
    assert all(r["us_per_reply"] > 0 for r in data["steps"])
    assert_finite(data)


def test_pfl_smoke_runs_the_fl_sim_side_and_says_when_pfl_is_missing(tmp_path, child_path):
    """Without pfl (this environment) the smoke run measures fl-sim in the peer's harness and names what is
    missing; with pfl it also runs one pfl process on fl-sim's sampling."""
    from fl_sim.bench.bench_pfl import pfl_missing

    data = bench(tmp_path, "pfl")
    assert data["pfl_missing"] == pfl_missing() and data["smoke"] is True
    labels = {r["engine"] for r in data["summary"]}
    assert "fl-sim vectorized" in labels and (("pfl-1p" in labels) == (not pfl_missing()))
    for r in data["runs"]:
        assert "error" not in r, r
        assert r["steady_round_s"] > 0 and r["steady_cpu_s"] >= 0 and 0 <= r["final_test_accuracy"] <= 1
        assert r.get("same_sampling", True)
    if pfl_missing():
        skipped = runner.invoke(cli.app, ["bench", "pfl", "--out", str(tmp_path / "skip.json")])
        assert skipped.exit_code == 0 and "pfl skipped" in skipped.output
        assert json.loads((tmp_path / "skip.json").read_text()) == {"skipped": pfl_missing()}
    assert_finite(data, skip=("pfl_best_over_this",))
