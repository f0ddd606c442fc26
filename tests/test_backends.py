"""simulation.backend=auto (fl_sim.engine.auto): which configs run on which engine, and that auto changes no number."""

import csv

import pytest
from torch import nn

from fl_sim.engine.auto import choose_backend, resolve_backend
from fl_sim.config import ConfigError, load_config
from fl_sim.runs.simulation import run_experiment

MLP = nn.Sequential(nn.Flatten(), nn.Linear(60, 8), nn.ReLU(), nn.Linear(8, 10))


def cfg(*sets):
    return load_config("quickstart", list(sets))


def test_auto_is_the_default_and_a_plain_quickstart_runs_vectorized():
    c = cfg()
    assert c.simulation.backend == "auto"
    assert choose_backend(c, MLP)[0] == "vectorized"


@pytest.mark.parametrize("sets,engine", [
    (["simulation.ray_address=127.0.0.1:6379"], "ray"),  # an existing Ray cluster
    (["simulation.ray_num_cpus=2"], "ray"),  # the size of a local Ray cluster
    (["simulation.num_gpus=0.5"], "ray"),  # a GPU share per client process
    (["simulation.backend=ray"], "ray"),  # asked for
    (["simulation.backend=inline"], "inline"),
    (["simulation.backend=vectorized", "simulation.ray_num_cpus=2"], "vectorized"),  # asked for wins
    (["simulation.device=auto"], "vectorized"),  # the batched path's device
    (["simulation.num_cpus=0.5"], "vectorized"),  # Ray's default-valued knobs do not ask for Ray
])
def test_which_engine_a_config_gets(sets, engine):
    assert choose_backend(cfg(*sets), MLP)[0] == engine


def test_what_the_batched_path_cannot_train_runs_inline():
    assert choose_backend(cfg("strategy.name=daqusgd"), MLP) == (
        "inline", "DaQuSGD clients select and quantize their own samples (no batched path)")
    engine, why = choose_backend(cfg(), nn.Sequential(nn.Linear(60, 8), nn.BatchNorm1d(8)))
    assert engine == "inline" and "buffers" in why
    engine, why = choose_backend(cfg(), nn.Sequential(nn.Linear(60, 8), nn.Dropout(0.5)))
    assert engine == "inline" and "dropout" in why


def test_resolve_backend_returns_the_config_that_runs():
    c = cfg()
    resolved, _ = resolve_backend(c, MLP)
    assert resolved.simulation.backend == "vectorized" and c.simulation.backend == "auto"
    explicit = cfg("simulation.backend=inline")
    assert resolve_backend(explicit, MLP)[0] is explicit


def test_an_unknown_backend_names_the_choices():
    with pytest.raises(ConfigError, match="simulation.backend.*auto, ray, inline, vectorized"):
        cfg("simulation.backend=threads")


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "round_s")} for r in csv.DictReader(f)]


def test_auto_gives_the_explicit_backends_numbers(tmp_path):
    """A tiny run with backend=auto writes the same metrics as the same run on the engine auto chose
    (vectorized), and its summary says which engine ran it."""
    sets = ["rounds=2", "clients=12", "clients_per_round=5", "model.hidden=[8]", "eval_every=1", "checkpoint_every=0"]
    auto = run_experiment(cfg(*sets), tmp_path / "auto")
    explicit = run_experiment(cfg(*sets, "simulation.backend=vectorized"), tmp_path / "vectorized")
    assert auto["backend"] == explicit["backend"] == "vectorized"
    assert _rows(tmp_path / "auto" / "metrics.csv") == _rows(tmp_path / "vectorized" / "metrics.csv")
    assert auto["final_test_accuracy"] == explicit["final_test_accuracy"]
    daq = run_experiment(cfg(*sets, "strategy.name=daqusgd"), tmp_path / "daq")
    assert daq["backend"] == "inline"
