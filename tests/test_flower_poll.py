"""fl_sim.flower_poll: the indexed get_message_ins returns what Flower 1.41's own method returns."""

from __future__ import annotations

import pytest

from fl_sim import flower_poll

pytest.importorskip("flwr.server.superlink.linkstate.in_memory_linkstate")


def _positions(state, msgs) -> list[int]:
    order = list(state.message_ins_store)
    return [order.index(m.metadata.message_id) for m in msgs]


def test_patch_applies_to_this_flower():
    assert flower_poll.patchable(), "flwr's InMemoryLinkState.get_message_ins changed: re-check fl_sim/flower_poll.py"


def test_same_messages_as_flower():
    from flwr.app import Message, RecordDict
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    from fl_sim.bench.ray_profile import toy_link_state

    flower = InMemoryLinkState.__dict__["get_message_ins"]
    a, grid_a, ids_a = toy_link_state(5, 13)  # 3 messages for nodes 0-2, 2 for nodes 3-4
    b, grid_b, ids_b = toy_link_state(5, 13)
    # expire two of node 1's messages in both states (the check deletes them)
    for st, ids in ((a, ids_a), (b, ids_b)):
        for m in [m for m in st.message_ins_store.values() if m.metadata.dst_node_id == ids[1]][:2]:
            m.metadata.__dict__["_ttl"] = -1.0
    for step in range(4):
        for i in range(5):
            got_a = flower_poll._get_message_ins(a, node_id=ids_a[i], limit=1)
            got_b = flower(b, node_id=ids_b[i], limit=1)
            assert _positions(a, got_a) == _positions(b, got_b), (step, i)
            assert all(m.metadata.delivered_at for m in got_a)
        if step == 1:  # the store changes between passes: a deletion and a new message
            for st, grid, ids in ((a, grid_a, ids_a), (b, grid_b, ids_b)):
                st.delete_messages({next(iter(st.message_ins_store))})
                grid.push_messages([Message(RecordDict(), dst_node_id=ids[4], message_type="train")])
        assert len(a.message_ins_store) == len(b.message_ins_store)
    assert flower_poll._get_message_ins(a, node_id=ids_a[0], limit=None) == []
    with pytest.raises(AssertionError):
        flower_poll._get_message_ins(a, node_id=ids_a[0], limit=0)


def test_context_restores_flower(monkeypatch):
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    orig = InMemoryLinkState.__dict__["get_message_ins"]
    with flower_poll.fast_message_poll() as on:
        assert on and InMemoryLinkState.get_message_ins is flower_poll._get_message_ins
    assert InMemoryLinkState.__dict__["get_message_ins"] is orig
    monkeypatch.setenv(flower_poll.ENV, "flower")
    with flower_poll.fast_message_poll() as on:
        assert not on and InMemoryLinkState.__dict__["get_message_ins"] is orig
