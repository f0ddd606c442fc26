"""What fl-sim changes in how Flower 1.41's Ray backend moves messages: the indexed get_message_ins
returns what Flower's own method returns (fl_sim.engine.flower_poll); the ClientApp pickles as its recipe."""

from __future__ import annotations

import pytest

from fl_sim.engine import flower_poll

pytest.importorskip("flwr.server.superlink.linkstate.in_memory_linkstate")


def _positions(state, msgs) -> list[int]:
    order = list(state.message_ins_store)
    return [order.index(m.metadata.message_id) for m in msgs]


def test_patch_applies_to_this_flower():
    assert flower_poll.patchable(), "flwr's InMemoryLinkState.get_message_ins changed: re-check fl_sim/engine/flower_poll.py"


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


def test_client_app_pickles_as_its_recipe():
    import pickle

    import ray.cloudpickle as cloudpickle

    from fl_sim.clients.app import FlSimClientApp, make_client_app
    from fl_sim.clients.mods import compression_mod
    from fl_sim.config import load_config

    cfg = load_config("quickstart", ["rounds=1"])
    app = make_client_app(cfg)
    blob = cloudpickle.dumps(lambda: app)  # as Flower's Ray backend sends it with every message
    assert len(blob) < 3000  # the handlers' closures by value were 4.4 KB
    back = pickle.loads(blob)()
    assert isinstance(back, FlSimClientApp) and back is not app
    assert back._mods == [compression_mod] and back._fl_sim_recipe[0] == cfg
    assert callable(back.fl_sim_runtime)
