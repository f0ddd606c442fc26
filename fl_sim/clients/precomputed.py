"""Results computed for a message ahead of the ClientApp (fl_sim.engine.vectorized), looked up by the app and its mods.

The vectorized grid trains a chunk of clients in one batched call and, where fl-sim's own
``compression_mod`` would encode the replies, encodes them as one block too
(fl_sim.clients.cohort_encode). It puts each client's result in a dict keyed by :func:`precomputed_key`
and runs the app inside :func:`precomputed`; the app (kind "train", "evaluate") and ``compression_mod``
(kind "encode") :func:`take` the result for the message they handle. A result is used only for the
message it was computed from (same client, round and global-model record).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from flwr.app import Message

from fl_sim.wire import keys

__all__ = ["precomputed", "precomputed_key", "take"]

# (kind, cid, round, id of the message's global-model ArrayRecord) -> a result computed for that message
_PRECOMPUTED: ContextVar[dict[tuple, Any] | None] = ContextVar("fl_sim_precomputed", default=None)


def precomputed_key(kind: str, message: Message, cid: int) -> tuple:
    """The key of a batched result for ``message`` (kind "train", "evaluate" or "encode")."""
    config = message.content.get(keys.CONFIG)
    rnd = int(config.get(keys.ROUND, 0)) if config is not None else 0
    return (kind, cid, rnd, id(message.content.get(keys.ARRAYS)))


@contextmanager
def precomputed(results: dict[tuple, Any]) -> Iterator[None]:
    """Within this block the app replies from ``results`` (keyed by :func:`precomputed_key`) where a
    message has one: train results are (parameters name -> tensor, mean loss, examples), evaluate results
    (loss, accuracy), encode results a :class:`fl_sim.clients.cohort_encode.EncodedUpdate`."""
    token = _PRECOMPUTED.set(results)
    try:
        yield
    finally:
        _PRECOMPUTED.reset(token)


def take(kind: str, message: Message, cid: int):
    """The result of ``kind`` for this message (removed from the dict), or None."""
    results = _PRECOMPUTED.get()
    return None if results is None else results.pop(precomputed_key(kind, message, cid), None)
