"""A cheaper message lookup for Flower's simulation engine (1.41, 1.42) (its driver-side polling thread).

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) asks
the in-memory LinkState, every 0.1 s, for one message for *every* SuperNode
(``InMemoryLinkState.get_message_ins(node_id, limit=1)``). Each of those calls walks *all* stored
instruction messages and runs the full validity check (``_check_stored_messages``: clock read, TTL,
federation filter, a delete call) on each of them before it looks at the destination. A round of
``k`` messages to ``n`` nodes thus costs ``n * k`` checks per 0.1 s for as long as the round's
messages are in the store, i.e. for the whole round: driver CPU that grows with the round's wall time
(docs/perf/ray_profile.md: 0.3-0.5 of a core at 100 nodes x 100 messages, competing with the actors on
a 2-core machine).

:func:`fast_message_poll` replaces that method, for the duration of a ``with`` block, by one that
reads the node's own messages from an index by destination (rebuilt when the store changes) and runs
the same check on them only. What a call returns is unchanged: the first stored, still valid,
undelivered message(s) for the node, in store order, marked delivered. What changes is only which *other* nodes' messages a call also validates
(and deletes when expired): those are validated by their own node's call in the same polling pass,
and by the grid's ``get_message_res``. The patch applies only to the exact Flower source it was
written against (a hash of ``get_message_ins``: the same in flwr 1.41.0 and 1.42.0); on a Flower whose
method differs, Flower's method is left alone and one line is logged saying so; with
``FL_SIM_FLOWER_POLL=flower`` in the environment it is left alone silently.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["fast_message_poll", "patchable"]

# sha256[:16] of inspect.getsource(InMemoryLinkState.get_message_ins): flwr 1.41.0 and 1.42.0 (unchanged)
_KNOWN_SOURCE = {"6547c8dcbc62e12f"}
log = logging.getLogger("fl_sim")
_told = False  # the step-aside line is logged once per process
ENV = "FL_SIM_FLOWER_POLL"  # "flower": keep Flower's own method (A/B runs)


def _by_node(state) -> dict[int, list[str]]:
    """The state's stored instruction-message ids per destination node, in store order.

    Rebuilt when the store's key set has changed, detected by (size, newest key): messages are only
    ever added at the end under a fresh id (store_message_ins refuses a known id) or deleted, so any
    change moves one of the two. A stored message's destination never changes. Called under the lock.
    """
    store = state.message_ins_store
    version = (len(store), next(reversed(store), None))
    cached = state.__dict__.get("_fl_sim_by_node")
    if cached is None or cached[0] != version:
        index: dict[int, list[str]] = {}
        for msg_id, msg in store.items():
            index.setdefault(msg.metadata.dst_node_id, []).append(msg_id)
        cached = state.__dict__["_fl_sim_by_node"] = (version, index)
    return cached[1]


def _get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None):
    """InMemoryLinkState.get_message_ins of flwr 1.41, reading only the node's own messages (same result)."""
    from flwr.supercore.date import now

    if limit is not None and limit < 1:
        raise AssertionError("`limit` must be >= 1")
    message_ins_list = []
    with self.lock:
        for msg_id in list(_by_node(self).get(node_id, ())):
            self._check_stored_messages({msg_id})
            if (
                (msg_ins := self.message_ins_store.get(msg_id))
                and (run_id is None or msg_ins.metadata.run_id == run_id)
                and msg_ins.metadata.delivered_at == ""
            ):
                message_ins_list.append(msg_ins)
            if limit and len(message_ins_list) == limit:
                break
    if not message_ins_list:  # most calls of a polling pass: skip the clock read
        return message_ins_list
    delivered_at = now().isoformat()
    for msg_ins in message_ins_list:
        msg_ins.metadata.delivered_at = delivered_at
    return message_ins_list


def patchable() -> bool:
    """Whether the installed Flower has the exact method this module replaces (and the env allows it)."""
    if os.environ.get(ENV, "").lower() == "flower":
        return False
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

        src = inspect.getsource(InMemoryLinkState.get_message_ins)
    except (ImportError, OSError, TypeError, AttributeError):
        return False
    return hashlib.sha256(src.encode()).hexdigest()[:16] in _KNOWN_SOURCE


def _flower_version() -> str:
    try:
        from importlib.metadata import version

        return version("flwr")
    except Exception:  # noqa: BLE001 - only for the log line
        return "(unknown version)"


@contextmanager
def fast_message_poll() -> Iterator[bool]:
    """Within the block, Flower's in-memory LinkState looks up a node's messages by destination first.

    Yields whether the patch is in place (False: unknown Flower source or ``FL_SIM_FLOWER_POLL=flower``).
    """
    global _told
    if not patchable():
        if not _told and os.environ.get(ENV, "").lower() != "flower":
            _told = True
            log.warning("Flower %s's in-memory LinkState is not the one fl-sim's faster message poll was written for; "
                        "Flower's own polling is used (correct, more driver CPU with many nodes)", _flower_version())
        yield False
        return
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    orig = InMemoryLinkState.__dict__["get_message_ins"]
    InMemoryLinkState.get_message_ins = _get_message_ins
    try:
        yield True
    finally:
        InMemoryLinkState.get_message_ins = orig
