"""Replies are tied to the round they answer, and a payload's bit count is part of what is checked.

compression_mod adds the record ``fl-sim.reply`` holding the round of the train message a reply answers;
the server rejects a reply for another round (a stale one, or a node replaying its previous reply) and a
reply that names none. Before this, a node that sent its round-1 reply again in round 2 was accepted as a
fresh update. A payload whose ``bits`` differs from what its content takes was rejected by some codecs'
decoders and only logged by the others; it is rejected for every codec.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.wire import keys
from fl_sim.clients import compression_mod
from fl_sim.strategies import FedAvgBaseline
from fl_sim.testing import InMemoryGrid
from test_reply_checks import K, cfg_for, round_one, server_part

STRATEGIES = {
    "fedavg (full models)": ({"name": "fedavg"}, None),
    "topk (decoded per reply)": ({"name": "compressed"}, {"name": "topk", "k": 20}),
    "fiht_cs (summed compressed)": ({"name": "fiht_cs", "compression": 4}, None),
}


def two_rounds(strategy, codec, replace):
    """Round 1 honest; in round 2 ``replace(replies_2, replies_1)`` -> the replies the server reads.
    Returns round 2's server metrics. Every client is sampled every round (clients = clients_per_round)."""
    s, grid, first = round_one(cfg_for(strategy, codec, clients=K))
    kept = [copy.deepcopy(r) for r in first]
    arrays, metrics = s.aggregate_train(1, first)
    assert server_part(metrics)["clients_ok"] == K
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid))
    second = replace(list(grid.send_and_receive(msgs)), kept)
    _, metrics = s.aggregate_train(2, second)
    return server_part(metrics)


def replay_first_node(now, before):
    """The first node sends its previous round's reply again (same client, same node)."""
    node = now[0].metadata.src_node_id
    old = next(r for r in before if r.metadata.src_node_id == node)
    return [old] + now[1:]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_replayed_previous_round_reply_rejected(name, caplog):
    strategy, codec = STRATEGIES[name]
    with caplog.at_level("ERROR", logger="fl_sim"):
        metrics = two_rounds(strategy, codec, replay_first_node)
    assert metrics["clients_rejected"] == 1 and metrics["clients_ok"] == K - 1
    assert any("answers round 1, this is round 2" in r.getMessage() for r in caplog.records), caplog.text


def test_honest_rounds_unaffected():
    metrics = two_rounds(*STRATEGIES["topk (decoded per reply)"], lambda now, before: now)
    assert metrics["clients_rejected"] == 0 and metrics["clients_ok"] == K


def test_reply_without_the_round_record_rejected(caplog):
    """A ClientApp without compression_mod says no round: refused, naming the fix."""
    def strip(now, before):
        del now[0].content[keys.REPLY_META]
        return now

    with caplog.at_level("ERROR", logger="fl_sim"):
        metrics = two_rounds({"name": "fedavg"}, None, strip)
    assert metrics["clients_rejected"] == 1
    assert any("compression_mod" in r.getMessage() and "which round" in r.getMessage() for r in caplog.records)


def test_mod_adds_the_round_to_full_model_replies():
    """compression_mod on a plain app (no codec in the config): the reply gets the round, nothing else changes."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def _train(msg: Message, ctx):
        return Message(RecordDict({keys.ARRAYS: msg.content[keys.ARRAYS],
                                   keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 1})}), reply_to=msg)

    grid = InMemoryGrid(app, 2)
    s = FedAvgBaseline(clients_per_round=2, client_ids=range(2))
    s.round_offset = 6  # a resumed run: Flower's round 1 is the method's round 7
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(msgs))
    assert [r.content[keys.REPLY_META][keys.R_ROUND] for r in replies] == [7, 7]
    assert set(replies[0].content.keys()) == {keys.ARRAYS, keys.METRICS, keys.REPLY_META}
    _, metrics = s.aggregate_train(1, replies)
    assert server_part(metrics)["clients_ok"] == 2


@pytest.mark.parametrize("strategy,codec", [({"name": "compressed"}, {"name": "qcs", "k": 8, "block": 32}),
                                            ({"name": "fiht_cs", "compression": 4}, None)])
def test_payload_bit_claim_other_than_its_content_rejected(strategy, codec, caplog):
    """Codecs whose decoder does not check the claim itself (QCS, CS-FIHT): the server's check refuses it."""
    def lie(now, before):
        meta = now[0].content[keys.PAYLOAD_META]
        meta[keys.P_BITS] = int(meta[keys.P_BITS]) // 2
        return now

    with caplog.at_level("ERROR", logger="fl_sim"):
        metrics = two_rounds(strategy, codec, lie)
    assert metrics["clients_rejected"] == 1 and metrics["clients_ok"] == K - 1
    assert any("payload claims" in r.getMessage() for r in caplog.records), caplog.text
    assert math.isfinite(metrics["uplink_bits"])
