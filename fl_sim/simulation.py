"""Run a config on Flower's simulation engine (Ray backend), behind one function.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.41 but is the only API that takes
fractional client resources; everything that touches it is in :func:`run_flower_simulation`, so it
can be swapped for its successor in one place.

The ServerApp's main runs in a thread of this process: it drives ``strategy.start`` of Flower and
records one row per round from ``evaluate_fn`` (called by Flower after every round), evaluating the
global model on the held-out test set every ``eval_every`` rounds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .build import Experiment, build_experiment, build_strategy
from .config import RunConfig, config_to_dict
from .results import RunRecorder

__all__ = ["run_experiment", "server_loop", "run_flower_simulation", "default_run_dir"]

log = logging.getLogger("fl_sim")

ProgressFn = Callable[[int, dict[str, Any]], None]


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.strategy.name}-{cfg.data.name.replace(':', '_').replace('/', '_')}"
    return Path(cfg.out) / f"{name}-s{cfg.seed}-{stamp}"


def server_loop(
    grid: Grid, exp: Experiment, strategy, recorder: RunRecorder | None, progress: ProgressFn | None = None
):
    """Run ``strategy.start`` for cfg.rounds rounds, recording a row per round. Returns Flower's Result."""
    cfg = exp.cfg
    t0 = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        due = server_round == 0 or server_round == cfg.rounds or (cfg.eval_every and server_round % cfg.eval_every == 0)
        row: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            row.update(strategy.last_metrics)
        else:
            row.update(uplink_bits=0, downlink_bits=0)
        out = None
        if due:
            loss, acc = exp.evaluate(arrays)
            row.update(test_loss=loss, test_accuracy=acc)
            out = MetricRecord({"test_loss": loss, "test_accuracy": acc})
        row["wall_s"] = time.perf_counter() - t0
        if recorder is not None:
            recorder.add(row)
        if progress is not None:
            progress(server_round, row)
        return out

    return strategy.start(grid=grid, initial_arrays=exp.initial_arrays, num_rounds=cfg.rounds, evaluate_fn=evaluate_fn)


def run_flower_simulation(server_app: ServerApp, client_app, cfg: RunConfig, num_supernodes: int) -> None:
    """The one call into Flower's (deprecated) simulation entry point."""
    from flwr.simulation import run_simulation

    # Ray's accelerator-env warning for num_gpus=0 is noise on CPU machines.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    init_args: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
    if cfg.simulation.ray_address:
        init_args["address"] = cfg.simulation.ray_address
    elif cfg.simulation.ray_num_cpus:
        init_args["num_cpus"] = cfg.simulation.ray_num_cpus
    backend_config = {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus, "num_gpus": cfg.simulation.num_gpus},
        "init_args": init_args,
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=backend_config,
        verbose_logging=False,
    )


class _DropDeprecation(logging.Filter):
    """run_simulation's deprecation notice: fl-sim knows, and keeps the call in one place."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage() and "deprecated feature" not in record.getMessage()


def _quiet_flower(level: str) -> None:
    lvl = getattr(logging, level.upper(), logging.WARNING)
    for name in ("flwr", "ray"):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        if not any(isinstance(f, _DropDeprecation) for f in logger.filters):
            logger.addFilter(_DropDeprecation())


def run_experiment(cfg: RunConfig, run_dir: Path | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run a config end to end in Flower's simulation engine; returns summary.json's content."""
    from .clients.app import make_client_app

    exp = build_experiment(cfg)
    strategy = build_strategy(exp, min_available_nodes=cfg.clients)
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    recorder = RunRecorder(run_dir, config_to_dict(cfg))
    errors: list[BaseException] = []

    def serve(grid: Grid) -> None:
        try:
            server_loop(grid, exp, strategy, recorder, progress)
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    _quiet_flower(cfg.simulation.log_level)
    if cfg.simulation.backend == "inline":
        from .testing import InMemoryGrid

        serve(InMemoryGrid(make_client_app(cfg), cfg.clients))
    else:
        server_app = ServerApp()
        server_app.main()(lambda grid, context: serve(grid))
        run_flower_simulation(server_app, make_client_app(cfg), cfg, num_supernodes=cfg.clients)
    if errors:
        raise errors[0]
    if len(recorder.rows) < cfg.rounds + 1:
        raise RuntimeError(
            f"the simulation stopped after {len(recorder.rows) - 1} of {cfg.rounds} rounds; see the log above"
        )
    return recorder.finish(
        {
            "strategy": cfg.strategy.name,
            "codec": cfg.codec.name if cfg.strategy.name == "compressed" else cfg.strategy.name,
            "parameters": exp.dim,
            "clients": cfg.clients,
            "clients_with_data": int(len(exp.data.eligible_clients)),
            "seed": cfg.seed,
            "run_dir": str(run_dir),
        }
    )
