"""``WaveGrid``: a Grid proxy that sends a round's train messages in waves when clients share a node.

Flower's ``Strategy.start`` calls ``grid.send_and_receive`` itself, so this lives on the grid the
ServerApp hands to ``start`` (fl-sim's ``server_loop`` installs it; in your own ServerApp,
``strategy.start(grid=WaveGrid(grid), ...)``), not on the strategy.

Why: when clients keep error-feedback residuals in node contexts (``keys.EF`` not "none" and
``keys.EF_STORE`` = "context", read from the messages' config) and two clients of a round go to one
node, Flower's simulation engine runs both messages concurrently and keeps only one of the contexts
they return, so a residual update is lost (measured: top-k + EF, 12 clients on 3 Ray nodes, drifted
from the one-node-per-client run from round 2). Waves (the k-th message of every node in wave k)
keep the replies, hence the aggregate, those of one node per client. Any other call is passed on
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fl_sim.strategies.gridproxy import GridProxy
from fl_sim.wire import keys

__all__ = ["WaveGrid", "needs_waves"]

log = logging.getLogger("fl_sim")


def _codec_config(msg: Message) -> ConfigRecord | None:
    return next((c for c in msg.content.config_records.values() if keys.CODEC in c), None)


def needs_waves(messages: list[Message]) -> bool:
    """True when two messages go to one node and their clients keep residuals in node contexts."""
    nodes = [m.metadata.dst_node_id for m in messages]
    if len(set(nodes)) == len(nodes):
        return False
    config = _codec_config(messages[0])
    return config is not None and str(config.get(keys.EF, "none")) != "none" and \
        str(config.get(keys.EF_STORE, "context")) == "context"


class WaveGrid(GridProxy):
    """Delegates everything to ``grid``; ``send_and_receive`` sends one message per node at a time when
    :func:`needs_waves` says so."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self._told = False

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or not needs_waves(messages):
            return self.grid.send_and_receive(messages, timeout=timeout)
        nodes = [m.metadata.dst_node_id for m in messages]
        if not self._told:
            self._told = True
            log.info("%d clients on %d nodes keep residuals in node contexts; a node's clients are sent in "
                     "successive waves (one message per node at a time)", len(nodes), len(set(nodes)))
        waves: list[list[Message]] = []
        seen: dict[int, int] = {}
        for msg, node in zip(messages, nodes):
            k = seen.get(node, 0)
            seen[node] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(msg)
        replies: list[Message] = []
        for wave in waves:
            replies.extend(self.grid.send_and_receive(wave, timeout=timeout))
        return replies
