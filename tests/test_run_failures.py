"""A run whose clients all fail, or whose Ray worker died, must not end as a success."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import Error, Message

from fl_sim.config import config_from_dict
from fl_sim.testing import InMemoryGrid

RAY_DEATH = ("<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task. "
             "class_name: ClientAppActor'>")


def small(**over):
    raw = {"rounds": 3, "clients": 6, "clients_per_round": 3, "data": {"name": "synthetic", "partition": "natural"},
           "model": {"name": "mlp", "hidden": [8]}, "train": {"lr": 0.05, "batch_size": 16},
           "simulation": {"backend": "inline"}}
    raw.update(over)
    return config_from_dict(json.loads(json.dumps(raw)))


def failing_app(cfg, **_):
    def app(message, context):
        raise RuntimeError("this client always fails")
    return app


def test_run_where_every_client_failed_exits_with_totals(tmp_path, monkeypatch):
    import fl_sim.clients.app
    from fl_sim.runs.simulation import RunFailed, run_experiment

    monkeypatch.setattr(fl_sim.clients.app, "make_client_app", failing_app)
    with pytest.raises(RunFailed, match="every client failed in every round"):
        run_experiment(small(), tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["clients_ok_total"] == 0 and summary["clients_failed_total"] == 9
    assert summary["rounds_without_update"] == 3


def test_summary_carries_failure_totals(tmp_path):
    from fl_sim.runs.simulation import run_experiment

    summary = run_experiment(small(), tmp_path / "run")
    assert summary["clients_ok_total"] == 9 and summary["clients_failed_total"] == 0
    assert summary["clients_rejected_total"] == 0 and summary["rounds_without_update"] == 0


class DyingWorkerGrid(InMemoryGrid):
    """From round 2 on, node ``dead``'s replies are what Flower's Ray backend returns for a dead actor."""

    dead: int = 0
    calls = 0

    def send_and_receive(self, messages, *, timeout=None):
        self.calls += 1
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if self.calls < 2:
            return replies
        return [Message(Error(code=0, reason=RAY_DEATH), reply_to=m) if m.metadata.dst_node_id == self.dead else r
                for m, r in zip(self.sent, replies)]


def test_dead_ray_worker_stops_the_run_loudly():
    from fl_sim.runs.build import build_experiment, build_strategy
    from fl_sim.clients.app import make_client_app
    from fl_sim.runs.simulation import RunFailed, server_loop

    cfg = small(clients_per_round=6)
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = DyingWorkerGrid(make_client_app(cfg), cfg.clients)
    grid.dead = grid.node_ids[1]
    rows = []
    with pytest.raises(RunFailed, match=f"round 2: a Ray worker died \\(node {grid.dead}: .*ActorDiedError"):
        server_loop(grid, exp, strategy, None, lambda r, row: rows.append(row))
    assert [r["round"] for r in rows] == [0, 1, 2]  # round 2 is recorded, round 3 never runs


def _dies_in_round_2(msg, context, call_next):  # a ClientApp mod: the worker process exits hard
    from fl_sim.wire import keys

    config = msg.content.get(keys.CONFIG)
    if config is not None and int(config.get(keys.ROUND, 0)) == 2 and int(config.get(keys.CID, -1)) == 0:
        os._exit(1)
    return call_next(msg, context)


@pytest.mark.e2e
def test_ray_worker_killed_hard_fails_the_run(tmp_path, monkeypatch):
    """One Ray worker exits hard (os._exit) in round 2: the run stops with RunFailed, not exit 0."""
    import fl_sim.clients.app
    from fl_sim.clients.mods import compression_mod
    from fl_sim.runs.simulation import RunFailed, run_experiment

    real = fl_sim.clients.app.make_client_app
    monkeypatch.setattr(fl_sim.clients.app, "make_client_app",
                        lambda cfg, **kw: real(cfg, mods=[_dies_in_round_2, compression_mod]))
    cfg = small(rounds=4, clients=4, clients_per_round=4, simulation={"backend": "ray"})
    with pytest.raises(RunFailed, match="Ray worker died"):
        run_experiment(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and "Ray worker died" in summary["failed"]
