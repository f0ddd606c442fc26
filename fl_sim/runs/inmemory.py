"""The in-memory run: a RunConfig through the real strategy and ClientApp, transport by function calls.

The same code path as ``fl-sim run`` (build -> server_loop -> RunRecorder) on the engine's
InMemoryGrid, or its batched VectorizedGrid with ``simulation.backend=vectorized`` (``auto`` and ``ray``
run inline here: the reference numbers tests compare against). Tests and
notebooks use it through ``fl_sim.testing.run_in_memory``.
"""

from __future__ import annotations

from fl_sim.clients.app import make_client_app
from fl_sim.config import config_to_dict
from fl_sim.engine.inline import InMemoryGrid
from fl_sim.engine.vectorized import VectorizedGrid
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.runs.results import RunRecorder
from fl_sim.runs.simulation import server_loop
from fl_sim.wire import keys

__all__ = ["run_in_memory", "round_replies"]


def run_in_memory(cfg, run_dir=None, *, num_nodes: int | None = None):
    """Run a RunConfig through the real strategy and ClientApp on an InMemoryGrid (no Ray).

    Returns (summary or None, recorder rows, strategy). Same code path as ``fl-sim run`` except the
    transport: messages are function calls in this process (batched ones with
    ``simulation.backend=vectorized``).
    """

    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid_class = VectorizedGrid if cfg.simulation.backend == "vectorized" else InMemoryGrid
    grid = grid_class(make_client_app(cfg), num_nodes or cfg.clients)
    recorder = RunRecorder(run_dir, config_to_dict(cfg)) if run_dir is not None else None
    rows: list[dict] = []
    server_loop(grid, exp, strategy, recorder, lambda rnd, row: rows.append(dict(row)))
    summary = recorder.finish({"strategy": cfg.strategy.name}) if recorder is not None else None
    return summary, rows, strategy


def round_replies(cfg, grid_factory):
    """(the replies of every round's ``send_and_receive`` as {client id: reply}, the grid) of a config run
    through the real strategy on ``grid_factory(client_app, num_nodes)``: compares what two grids return."""
    exp = build_experiment(cfg)
    strategy = build_strategy(exp)
    grid = grid_factory(make_client_app(cfg), cfg.clients)
    replies: list[dict] = []
    send = grid.send_and_receive

    def recording(messages, *, timeout=None):
        out = list(send(messages, timeout=timeout))
        replies.append({int(r.content[keys.METRICS][keys.M_CID]): r for r in out})
        return out

    grid.send_and_receive = recording
    server_loop(grid, exp, strategy, None)
    return replies, grid
