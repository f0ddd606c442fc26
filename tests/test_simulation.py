"""End-to-end runs: in memory (fast, every round through the real ClientApp) and one through Ray."""

import json

import pytest

from fl_sim.config import config_from_dict
from fl_sim.testing import run_in_memory

SMALL = {
    "rounds": 3,
    "clients": 12,
    "clients_per_round": 4,
    "data": {"name": "synthetic", "partition": "natural"},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"lr": 0.05, "batch_size": 16},
}


def small(**over):
    raw = json.loads(json.dumps(SMALL))
    for k, v in over.items():
        node = raw
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return config_from_dict(raw)


def test_in_memory_run_is_deterministic_and_counts_bits(tmp_path):
    cfg = small()
    s1, rows1, strat = run_in_memory(cfg, tmp_path / "a")
    _, rows2, _ = run_in_memory(cfg)
    assert [r["test_accuracy"] for r in rows1] == [r["test_accuracy"] for r in rows2]
    assert [r.get("train_loss") for r in rows1[1:]] == [r.get("train_loss") for r in rows2[1:]]
    d = strat._global_vector.numel()
    for r in rows1[1:]:
        assert r["uplink_bits"] == 4 * 32 * d
        assert r["downlink_bits"] == 4 * 32 * d
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 5  # header + rounds 0..3
    assert s1["total_uplink_bits"] == 3 * 4 * 32 * d


def test_different_seed_differs():
    _, a, _ = run_in_memory(small())
    _, b, _ = run_in_memory(small(seed=1))
    assert [r["test_accuracy"] for r in a] != [r["test_accuracy"] for r in b]


@pytest.mark.e2e
def test_ray_simulation_two_rounds(tmp_path):
    from fl_sim.runs.simulation import run_experiment

    cfg = small(rounds=2, **{"simulation.backend": "ray"})  # the default (auto) would run it vectorized
    summary = run_experiment(cfg, tmp_path / "run")
    assert summary["backend"] == "ray"
    lines = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert lines[0].startswith("round,train_loss,test_loss,test_accuracy,uplink_bits,downlink_bits,total_bits,wall_s")
    assert len(lines) == 4  # header + rounds 0, 1, 2
    assert summary["rounds"] == 2 and summary["total_uplink_bits"] > 0
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()
    # The Ray run computes exactly what the in-memory run computes.
    _, rows, _ = run_in_memory(cfg)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_test_accuracy"] == pytest.approx(
        rows[-1]["test_accuracy"], abs=1e-9
    )


@pytest.mark.parametrize("config", ["configs/topk_ef.yaml", "configs/fiht_cs.yaml"])
def test_routing_clients_onto_fewer_supernodes_changes_no_number(tmp_path, config):
    """simulation.supernodes only chooses how many Flower nodes carry the clients (cid -> node cid % n):
    data, randomness and the disk residual store all follow the client id, so the metrics are the same."""
    from fl_sim.config import load_config
    from fl_sim.runs.simulation import run_experiment

    sets = ["rounds=3", "clients=12", "clients_per_round=5", "model.hidden=[8]", "eval_every=1",
            "simulation.backend=inline"]
    rows = {}
    for n in (12, 3):
        summary = run_experiment(load_config(config, sets + [f"simulation.supernodes={n}"]), tmp_path / str(n))
        assert summary["rounds"] == 3
        rows[n] = [{k: v for k, v in r.items() if k not in ("wall_s", "round_s")}
                   for r in _csv_rows(tmp_path / str(n) / "metrics.csv")]
    assert rows[3] == rows[12]


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_automatic_supernodes_and_their_errors():
    from fl_sim.config import AUTO_SUPERNODES, ConfigError, load_config

    def n(*sets):
        return load_config("configs/quickstart.yaml", list(sets)).num_supernodes()

    assert n("clients=200") == 200  # small populations: one node per client
    assert n("clients=100000", "clients_per_round=100") == AUTO_SUPERNODES
    assert n("clients=100000", "clients_per_round=5000") == 5000  # never fewer nodes than clients per round
    assert n("clients=100000", "simulation.residual_store=context") == 100000
    assert n("clients=100000", "simulation.supernodes=64") == 64
    with pytest.raises(ConfigError, match="simulation.supernodes"):
        n("clients=10", "simulation.supernodes=11")
    with pytest.raises(ConfigError, match="race"):
        n("clients=10", "simulation.supernodes=5", "simulation.residual_store=context")
