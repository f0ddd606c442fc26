"""``GridProxy``: a Grid that passes every call on to the grid it wraps; subclasses change what they need.

Flower's ``Strategy.start`` talks to the grid it is given, so round-level behaviour that is not the
strategy's (sending in waves: :class:`~fl_sim.strategies.waves.WaveGrid`; SecAgg+'s stages:
:class:`~fl_sim.strategies.secagg.SecAggPlusGrid`) lives on a proxy around the ServerApp's grid.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["GridProxy"]


class GridProxy(Grid):
    """Delegates the Grid API, and any extra attribute of a concrete grid (InMemoryGrid.fail_nodes...), to ``grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str):
        if name == "grid":
            raise AttributeError(name)
        return getattr(self.grid, name)
