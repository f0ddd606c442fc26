"""Run a config end to end: build it, pick the engine's grid (Ray, inline or vectorized; ``simulation.backend:
auto``, the default, picks the fastest that applies: fl_sim.engine.auto), record rounds.

The Ray engine is called through :func:`fl_sim.engine.ray.run_flower_simulation` (the one call into
Flower's deprecated ``run_simulation``); the inline and vectorized grids run in this process.

The ServerApp's main runs in a thread of this process: it drives ``strategy.start`` of Flower and
records one row per round from ``evaluate_fn`` (called by Flower after every round), evaluating the
global model on the held-out test set every ``eval_every`` rounds and every round of the last
``eval_tail`` fraction of them (:func:`eval_due`).

Long runs: every ``checkpoint_every`` rounds the same callback writes a checkpoint
(fl_sim.runs.checkpoint); ``run_experiment(..., resume=True)`` (``fl-sim run --resume DIR``) loads the
newest one and continues at the next round with the same results as a run that was never stopped.
Methods with client error feedback keep their residuals in the run's disk store
(fl_sim.clients.residuals, RUN_DIR/state/residuals) unless ``simulation.residual_store=context``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fl_sim.engine.auto import resolve_backend
from fl_sim.runs.build import Experiment, build_experiment, build_strategy, check_sampling_options
from fl_sim.runs.checkpoint import (config_differences, config_hash, latest_checkpoint, remove_checkpoints, save_checkpoint,
                         save_model)
from fl_sim.config import ConfigError, RunConfig, config_to_dict
from fl_sim.runs.results import RunRecorder
from fl_sim.runs.rundir import claim
from fl_sim.engine.ray import quiet_flower, run_flower_simulation, serial_torch_in_driver

__all__ = [
    "run_experiment", "server_loop", "run_flower_simulation", "default_run_dir", "RunFailed", "NothingAggregated",
]

log = logging.getLogger("fl_sim")

ProgressFn = Callable[[int, dict[str, Any]], None]

# A Ray worker (actor) that died: Flower's actor pool keeps it, so every later job sent to it fails.
_DEAD_WORKER = re.compile(r"ray\.exceptions\.(ActorDiedError|RayActorError|ActorUnavailableError|WorkerCrashedError)")


class RunFailed(RuntimeError):
    """The run cannot produce a result worth keeping (a dead Ray worker, or no client ever succeeded)."""


def dead_worker_error(strategy, server_round: int) -> RunFailed | None:
    """RunFailed naming the dead Ray worker when this round's error replies report one, else None.

    Flower 1.41's Ray backend returns an actor to its pool even after the actor died, so from then on
    every message routed to it fails (measured: 70-80% of the clients of every later round) while the
    run goes on. Nothing in Flower's public API replaces the actor, so the run stops here, loudly.
    """
    for node, reason in getattr(strategy, "last_errors", ()):
        if _DEAD_WORKER.search(reason):
            return RunFailed(
                f"round {server_round}: a Ray worker died (node {node}: {reason.splitlines()[0][:200]}); Flower "
                "keeps the dead worker in its pool, so its clients would fail in every later round; the run "
                "was stopped: find why the worker died (memory? simulation.num_cpus/num_gpus), then rerun or "
                "--resume from the last checkpoint"
            )
    return None


def failure_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the training rounds (round >= 1) of replies used, failed and rejected, for summary.json."""
    train = [r for r in rows if r.get("round", 0) > 0]

    def total(key: str) -> int:
        return int(sum(r.get(key) or 0 for r in train))

    return {"clients_ok_total": total("clients_ok"), "clients_failed_total": total("clients_failed"),
            "clients_rejected_total": total("clients_rejected"),
            "rounds_without_update": sum(1 for r in train if not r.get("clients_ok"))}


class NothingAggregated(RunFailed):
    """The run finished but no round aggregated an update (every reply failed or was rejected): a
    :class:`RunFailed`, so one ``except RunFailed`` handles both (CLI: one line, exit 1)."""


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<name>-s<seed>-<time>, with -2, -3, ... when a run started in the same second has it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.name or f"{cfg.strategy.name}-{cfg.data.name.replace(':', '_').replace('/', '_')}"
    base = Path(cfg.out) / f"{name}-s{cfg.seed}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def secure_grid(grid: Grid, cfg: RunConfig, strategy) -> Grid:
    """``grid`` behind SecAgg+ (fl_sim.strategies.secagg) when the config's ``secagg.enabled``, else itself."""
    sa = cfg.secagg
    if not sa.enabled:
        return grid
    from fl_sim.strategies.secagg import SecAggPlusGrid

    return SecAggPlusGrid(grid, strategy, num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
                          max_weight=sa.max_weight, clipping_range=sa.clipping_range,
                          quantization_range=sa.quantization_range, modulus_range=sa.modulus_range,
                          timeout=sa.timeout or None, on_failure=sa.on_failure)


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
    """Run Flower's own ``strategy.start`` for cfg.rounds rounds, recording a row per round. Returns
    Flower's Result.

    The grid is wrapped in :class:`~fl_sim.strategies.WaveGrid` (clients that share a node and keep
    residuals in its context are sent in waves). ``start_round``/``initial_arrays``/``wall_offset``:
    resume after a checkpoint of round ``start_round - 1`` (rows of the earlier rounds are already in
    ``recorder``): the strategy's ``round_offset`` becomes ``start_round - 1`` and Flower's ``start``
    runs the remaining rounds (its log counts them from 1). ``on_round(round, arrays)`` runs after
    each round's row is recorded (checkpoints).
    """
    from fl_sim.strategies import WaveGrid

    cfg = exp.cfg
    t0 = time.perf_counter() - wall_offset
    offset = start_round - 1
    if not 0 <= offset <= cfg.rounds:
        raise ValueError(f"start_round={start_round} must be in 1..{cfg.rounds + 1}")
    if offset and not hasattr(strategy, "round_offset"):
        raise ValueError(f"{type(strategy).__name__} has no round_offset: only fl-sim methods can resume")
    if hasattr(strategy, "round_offset"):
        strategy.round_offset = offset

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + offset
        if flower_round == 0 and offset:  # resumed: round `offset`'s row is in the checkpoint
            return None
        due = eval_due(server_round, cfg)
        if server_round > 0:
            _check_finite(server_round, arrays, cfg)
        row: dict[str, Any] = {"round": server_round}
        if server_round > 0:
            row.update(getattr(strategy, "last_metrics", {}))
        else:
            row.update(uplink_bits=0, downlink_bits=0, total_bits=0)
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
        failed = dead_worker_error(strategy, server_round) if server_round > 0 else None
        if failed is not None:
            raise failed
        return out

    evaluate = evaluate_fn
    if cfg.simulation.backend == "ray":
        def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            try:
                return evaluate_fn(flower_round, arrays)
            finally:
                if flower_round == 0:
                    serial_torch_in_driver()

    arrays = exp.initial_arrays if initial_arrays is None else initial_arrays
    return strategy.start(grid=secure_grid(WaveGrid(grid), cfg, strategy), initial_arrays=arrays, num_rounds=cfg.rounds - offset,
                          evaluate_fn=evaluate)


def _check_finite(server_round: int, arrays: ArrayRecord, cfg: RunConfig) -> None:
    """A global model with inf/NaN never recovers: stop the run with one line instead of writing NaN results."""
    import numpy as np

    for name, a in arrays.items():
        x = a.numpy()
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise ValueError(
                f"round {server_round}: the global model diverged (non-finite values in {name!r}); lower "
                f"train.lr={cfg.train.lr:g} or strategy.server_lr={cfg.strategy.server_lr:g}"
            )


def residual_store(cfg: RunConfig, exp: Experiment, strategy, run_dir: Path):
    """The run's disk residual store (RUN_DIR/state/residuals) when the method has client error feedback.

    None when no client keeps a residual or ``simulation.residual_store=context`` (residuals in the
    node contexts, which a checkpoint cannot reach: then ``checkpoint_every`` must be 0). The store's
    address travels to the clients in every train message (``strategy.train_config``).
    """
    from fl_sim.clients.residuals import DiskResidualStore

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


def eval_due(server_round: int, cfg: Any) -> bool:
    """Whether round ``server_round`` is evaluated: round 0, the last round, every ``eval_every``-th round,
    and every one of the last ceil(``eval_tail`` x rounds) rounds (a held-accuracy verdict reads them all)."""
    tail = math.ceil(round(cfg.eval_tail * cfg.rounds, 9))
    return bool(server_round == 0 or server_round == cfg.rounds or server_round > cfg.rounds - tail
                or (cfg.eval_every and server_round % cfg.eval_every == 0))


def run_experiment(
    cfg: RunConfig,
    run_dir: Path | None = None,
    progress: ProgressFn | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a config end to end in Flower's simulation engine; returns summary.json's content.

    ``resume=True``: continue the run in ``run_dir`` from its newest checkpoint (its config must match
    ``cfg`` up to :data:`fl_sim.runs.checkpoint.ENGINE_KEYS`). A fresh run refuses a directory that holds
    another run unless ``overwrite=True``; the directory is locked while the run writes it
    (:func:`fl_sim.runs.rundir.claim`).
    """
    if run_dir is None and resume:
        raise ValueError("resume needs the run directory")
    run_dir = Path(run_dir) if run_dir else default_run_dir(cfg)
    with claim(run_dir, resume=resume, overwrite=overwrite):
        return _run_experiment(cfg, run_dir, progress, resume)


def _run_experiment(cfg: RunConfig, run_dir: Path, progress: ProgressFn | None, resume: bool) -> dict[str, Any]:
    from fl_sim.clients.app import make_client_app

    config = config_to_dict(cfg)
    ckpt = _checkpoint_to_resume(run_dir, config, cfg) if resume else None
    nodes = cfg.num_supernodes()  # the engine choice below changes only simulation.backend, not this
    check_sampling_options(cfg, nodes)  # before the data are built: a wait for missing nodes never ends
    exp = build_experiment(cfg)
    asked = cfg.simulation.backend
    cfg, why = resolve_backend(cfg, exp.model)  # simulation.backend=auto: the fastest engine that applies
    exp.cfg = cfg
    if asked == "auto":
        log.info("simulation.backend=auto: %s (%s)", cfg.simulation.backend, why)
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

    quiet_flower(cfg.simulation.log_level)
    if cfg.simulation.backend == "inline":
        from fl_sim.engine.inline import InMemoryGrid

        serve(InMemoryGrid(make_client_app(cfg), nodes))
    elif cfg.simulation.backend == "vectorized":  # batched clients (fl_sim.engine.vectorized)
        from fl_sim.engine.vectorized import VectorizedGrid, resolve_device

        try:
            resolve_device(cfg.simulation.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        serve(VectorizedGrid(make_client_app(cfg), nodes))
    else:
        server_app = ServerApp()
        server_app.main()(lambda grid, context: serve(grid))
        run_flower_simulation(server_app, make_client_app(cfg), cfg, num_supernodes=nodes)
    try:
        recorder.flush()  # metrics.csv with every round recorded, whatever happens next
    except OSError:
        if not errors:
            raise  # else the run's own error is the one to report
    if errors:
        from fl_sim.strategies.base import ClientSetupError

        if isinstance(errors[0], ClientSetupError):  # the ClientApp cannot work with the method: exit 1, one line
            errors[0] = RunFailed(str(errors[0]))
        if isinstance(errors[0], RunFailed):
            recorder.finish({"strategy": cfg.strategy.name, "failed": str(errors[0]), **failure_totals(recorder.rows)})
        raise errors[0]
    if len(recorder.rows) < cfg.rounds + 1:
        raise RuntimeError(
            f"the simulation stopped after {len(recorder.rows) - 1} of {cfg.rounds} rounds; see the log above"
        )
    totals = failure_totals(recorder.rows)
    info = {
        "strategy": cfg.strategy.name,
        "backend": cfg.simulation.backend,  # the engine that ran it (simulation.backend=auto resolved)
        "codec": cfg.codec.name if cfg.strategy.name == "compressed" else cfg.strategy.name,
        "parameters": exp.dim,
        "clients": cfg.clients,
        "clients_with_data": int(len(exp.data.eligible_clients)),
        "seed": cfg.seed,
        "run_dir": str(run_dir),
        "config_hash": config_hash(config),
        **totals,
    }
    # Two checks, one failure class (NothingAggregated is a RunFailed): no round changed the model (the
    # strategy's count: every reply rejected, or every aggregate refused), or no client reply was ever used.
    never_used = bool(cfg.rounds) and totals["clients_ok_total"] == 0
    if cfg.rounds and (getattr(strategy, "rounds_aggregated", 1) == 0 or never_used):
        why = (f"every client failed in every round ({totals['clients_failed_total']} failed or rejected replies, "
               "none used)" if never_used else "every reply failed or was rejected, or no aggregate could be applied")
        recorder.finish({**info, "failed": "nothing aggregated"})
        raise NothingAggregated(
            f"no round aggregated an update in {cfg.rounds} rounds: {why}; the model is the initial one, no model "
            f"saved; see the errors logged above and {run_dir / 'summary.json'}"
        )
    if results and results[0] is not None and len(results[0].arrays):
        save_model(run_dir, results[0].arrays)  # the final global model: RUN_DIR/model.pt
    # summary.json marks the run finished; only then may the state a resume needs go (a kill between
    # the two leaves a finished run, not one that can be neither resumed nor reported).
    summary = recorder.finish(info)
    if store is not None:  # working state of a finished run: nothing reads it any more
        store.destroy()
        try:
            store.directory.parent.rmdir()  # RUN_DIR/state, if nothing else is in it
        except OSError:
            pass
    remove_checkpoints(run_dir)
    return summary


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
