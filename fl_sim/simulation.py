"""Run a config on Flower's simulation engine (Ray backend), behind one function.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.41 but is the only API that takes
fractional client resources; everything that touches it is in :func:`run_flower_simulation`, so it
can be swapped for its successor in one place.

The ServerApp's main runs in a thread of this process: it drives ``strategy.start`` of Flower and
records one row per round from ``evaluate_fn`` (called by Flower after every round), evaluating the
global model on the held-out test set every ``eval_every`` rounds.

Long runs: every ``checkpoint_every`` rounds the same callback writes a checkpoint
(fl_sim.checkpoint); ``run_experiment(..., resume=True)`` (``fl-sim run --resume DIR``) loads the
newest one and continues at the next round with the same results as a run that was never stopped.
Methods with client error feedback keep their residuals in the run's disk store
(fl_sim.clients.residuals, RUN_DIR/state/residuals) unless ``simulation.residual_store=context``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .build import Experiment, build_experiment, build_strategy
from .checkpoint import config_differences, latest_checkpoint, remove_checkpoints, save_checkpoint, save_model
from .config import ConfigError, RunConfig, config_to_dict
from .results import RunRecorder

__all__ = ["run_experiment", "server_loop", "run_flower_simulation", "default_run_dir"]

log = logging.getLogger("fl_sim")

ProgressFn = Callable[[int, dict[str, Any]], None]


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.strategy.name}-{cfg.data.name.replace(':', '_').replace('/', '_')}"
    return Path(cfg.out) / f"{name}-s{cfg.seed}-{stamp}"


def server_loop(
    grid: Grid,
    exp: Experiment,
    strategy,
    recorder: RunRecorder | None,
    progress: ProgressFn | None = None,
    *,
    start_round: int = 1,
    initial_arrays: ArrayRecord | None = None,
    wall_offset: float = 0.0,
    on_round: Callable[[int, ArrayRecord], None] | None = None,
):
    """Run ``strategy.start`` for cfg.rounds rounds, recording a row per round. Returns Flower's Result.

    ``start_round``/``initial_arrays``/``wall_offset``: resume after a checkpoint (rows of the earlier
    rounds are already in ``recorder``). ``on_round(round, arrays)`` runs after each round's row is
    recorded (checkpoints).
    """
    cfg = exp.cfg
    t0 = time.perf_counter() - wall_offset

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
            val = exp.evaluate_validation(arrays)
            if val is not None:  # data.validation > 0: the tuning signal (never the test columns)
                row.update(val_loss=val[0], val_accuracy=val[1])
            out = MetricRecord({"test_loss": loss, "test_accuracy": acc})
        row["wall_s"] = time.perf_counter() - t0
        if recorder is not None:
            recorder.add(row)
        if on_round is not None:
            on_round(server_round, arrays)
        if progress is not None:
            progress(server_round, row)
        return out

    resume = {"start_round": start_round} if start_round != 1 else {}  # plain Flower strategies: round 1
    arrays = exp.initial_arrays if initial_arrays is None else initial_arrays
    return strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds, evaluate_fn=evaluate_fn, **resume)


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


def residual_store(cfg: RunConfig, exp: Experiment, strategy, run_dir: Path):
    """The run's disk residual store (RUN_DIR/state/residuals) when the method has client error feedback.

    None when no client keeps a residual or ``simulation.residual_store=context`` (residuals in the
    node contexts, which a checkpoint cannot reach: then ``checkpoint_every`` must be 0). The store's
    address travels to the clients in every train message (``strategy.train_config``).
    """
    from .clients.residuals import DiskResidualStore

    if getattr(strategy, "error_feedback", "none") == "none":
        return None
    if cfg.simulation.residual_store == "context":
        if cfg.checkpoint_every:
            raise ConfigError(
                "simulation.residual_store=context keeps client residuals where a checkpoint cannot reach them; "
                "use simulation.residual_store=disk or set checkpoint_every=0"
            )
        return None
    store = DiskResidualStore.create(
        run_dir / "state" / "residuals", dim=exp.dim, dtype=strategy.ef_dtype,
        budget_bytes=int(cfg.simulation.residual_budget_mb * 2**20),
    )
    strategy.train_config.update(store.wire_config())
    return store


def run_experiment(
    cfg: RunConfig, run_dir: Path | None = None, progress: ProgressFn | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Run a config end to end in Flower's simulation engine; returns summary.json's content.

    ``resume=True``: continue the run in ``run_dir`` from its newest checkpoint (its config must match
    ``cfg`` up to :data:`fl_sim.checkpoint.ENGINE_KEYS`).
    """
    from .clients.app import make_client_app

    if run_dir is None and resume:
        raise ValueError("resume needs the run directory")
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    config = config_to_dict(cfg)
    ckpt = _checkpoint_to_resume(run_dir, config, cfg) if resume else None
    if not resume:
        remove_checkpoints(run_dir)  # a fresh run in a used directory: never resume the old run's state
    exp = build_experiment(cfg)
    nodes = cfg.num_supernodes()
    strategy = build_strategy(exp, min_available_nodes=nodes)
    recorder = RunRecorder(run_dir, config)
    store = residual_store(cfg, exp, strategy, run_dir)
    start: dict[str, Any] = {}
    if ckpt is not None:
        if ckpt.strategy_class != type(strategy).__name__:
            raise ValueError(f"{ckpt.path}: written by strategy {ckpt.strategy_class}, this config builds "
                             f"{type(strategy).__name__}")
        strategy.load_state_dict(ckpt.strategy)
        if (ckpt.residuals is None) != (store is None):
            raise ValueError(f"{ckpt.path}: the checkpoint {'lacks' if store else 'has'} client residuals but this "
                             f"run {'keeps them' if store else 'keeps none'}; was simulation.residual_store changed?")
        if store is not None:
            store.restore(*ckpt.residuals)
        recorder.rows = [dict(r) for r in ckpt.rows]
        start = dict(start_round=ckpt.round + 1, initial_arrays=ckpt.arrays,
                     wall_offset=float(ckpt.rows[-1].get("wall_s") or 0.0))
        log.info("resuming %s at round %d of %d", run_dir, ckpt.round + 1, cfg.rounds)

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        if 0 < server_round < cfg.rounds and server_round % cfg.checkpoint_every == 0:
            save_checkpoint(run_dir, server_round, arrays, strategy, recorder.rows, config, store)

    on_round = checkpoint if cfg.checkpoint_every else None
    errors: list[BaseException] = []
    results: list[Any] = []

    def serve(grid: Grid) -> None:
        try:
            results.append(server_loop(grid, exp, strategy, recorder, progress, on_round=on_round, **start))
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    _quiet_flower(cfg.simulation.log_level)
    if cfg.simulation.backend == "inline":
        from .testing import InMemoryGrid

        serve(InMemoryGrid(make_client_app(cfg), nodes))
    else:
        server_app = ServerApp()
        server_app.main()(lambda grid, context: serve(grid))
        run_flower_simulation(server_app, make_client_app(cfg), cfg, num_supernodes=nodes)
    if errors:
        raise errors[0]
    if len(recorder.rows) < cfg.rounds + 1:
        raise RuntimeError(
            f"the simulation stopped after {len(recorder.rows) - 1} of {cfg.rounds} rounds; see the log above"
        )
    if store is not None:  # working state of a finished run: nothing reads it any more
        store.close()
        shutil.rmtree(store.directory, ignore_errors=True)
        try:
            store.directory.parent.rmdir()  # RUN_DIR/state, if nothing else is in it
        except OSError:
            pass
    if results and results[0] is not None and len(results[0].arrays):
        save_model(run_dir, results[0].arrays)  # the final global model: RUN_DIR/model.pt
    remove_checkpoints(run_dir)
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


def _checkpoint_to_resume(run_dir: Path, config: dict[str, Any], cfg: RunConfig):
    """The newest checkpoint of ``run_dir``, or a one-line error saying why there is nothing to resume."""
    import json

    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("rounds") == cfg.rounds:
        raise ValueError(f"{run_dir}: the run already finished ({cfg.rounds} rounds, summary.json); nothing to resume")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoint to resume from (checkpoint/round-*.pt; written every checkpoint_every rounds)"
        )
    diffs = config_differences(ckpt.config, config)
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ValueError(f"{run_dir}: the config differs from the checkpoint's: {diffs[0]}{more}")
    return ckpt
