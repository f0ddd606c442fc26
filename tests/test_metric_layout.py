"""One client's metric keys must never end the run: the inner strategy gets one layout per round.

Flower's FedAvg raises InconsistentMessageReplies when the replies of a round differ in their metric
keys; each case below ended the run with a traceback before fl-sim made the layouts consistent
(fl_sim.strategies.metric_keys): the odd reply is normalized (extra keys dropped) or rejected (an
agreed key missing or of another kind), logged once per client and counted.
"""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fl_sim.wire import keys
from fl_sim.strategies import FedAvgBaseline
from fl_sim.strategies.metric_keys import agreed_layout, conform, layout
from fl_sim.testing import InMemoryGrid
from test_reply_checks import K, cfg_for, initial, run_tampered, server_part, toy_app


def extra_key(reply, *_):
    reply.content[keys.METRICS]["extra"] = 1.0
    return reply


def no_train_loss(reply, *_):
    del reply.content[keys.METRICS][keys.TRAIN_LOSS]
    return reply


def renamed_record(reply, *_):
    reply.content["my-metrics"] = reply.content.pop(keys.METRICS)
    return reply


def reported_norm(reply, *_):
    reply.content[keys.METRICS][keys.UPDATE_NORM] = 1.0
    return reply


# case -> (tamper, used (normalized) or rejected)
CASES = {"extra key": (extra_key, "normalized"), "train-loss missing": (no_train_loss, "rejected"),
         "renamed MetricRecord": (renamed_record, "ok")}


def toy_round(strategy, tamper):
    grid = InMemoryGrid(toy_app(), 5)
    grid.tamper = lambda r: tamper(r) if int(r.content[keys.METRICS][keys.M_CID]) == 2 else r
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    return strategy.aggregate_train(1, grid.send_and_receive(msgs))


@pytest.mark.parametrize("case", sorted(CASES))
def test_odd_metric_keys_reach_fedavg_consistent(case, caplog):
    tamper, outcome = CASES[case]
    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0)
    with caplog.at_level("WARNING", logger="fl_sim"):
        arrays, metrics = toy_round(s, tamper)
    srv = server_part(metrics)
    assert arrays is not None
    assert "extra" not in metrics
    # toy clients: n_c = c + 1 and train-loss 0.5 each, so the weighted mean stays 0.5
    assert metrics[keys.TRAIN_LOSS] == pytest.approx(0.5)
    assert srv["clients_ok"] == (4 if outcome == "rejected" else 5)
    assert srv["clients_rejected"] == (1 if outcome == "rejected" else 0)
    assert srv["metrics_normalized"] == (1 if outcome == "normalized" else 0)
    if outcome != "ok":
        told = [r.getMessage() for r in caplog.records if "client 2" in r.getMessage()]
        assert len(told) == 1 and ("extra" in told[0] or "train-loss" in told[0]), told


def test_a_list_where_peers_send_a_number_is_rejected():
    def number(reply):
        reply.content[keys.METRICS]["acc"] = 0.5
        return reply

    def a_list(reply):
        reply.content[keys.METRICS]["acc"] = [0.5, 0.5]
        return reply

    s = FedAvgBaseline(clients_per_round=5, client_ids=range(5), seed=0)
    grid = InMemoryGrid(toy_app(), 5)
    grid.tamper = lambda r: (a_list if int(r.content[keys.METRICS][keys.M_CID]) == 2 else number)(r)
    msgs = list(s.configure_train(1, initial(), ConfigRecord(), grid))
    _, metrics = s.aggregate_train(1, grid.send_and_receive(msgs))
    assert server_part(metrics)["clients_rejected"] == 1 and metrics["acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy,codec", [({"name": "fedavg"}, None),
                                            ({"name": "compressed"}, {"name": "topk", "k": 20})])
def test_one_client_with_odd_metrics_does_not_end_the_run(case, strategy, codec, caplog):
    tamper, outcome = CASES[case]
    rows, _, nodes = run_tampered(cfg_for(strategy, codec, rounds=3, clients=K), tamper, caplog)
    assert len(rows) == 4 and all(math.isfinite(r["train_loss"]) for r in rows[1:])
    for r in rows[1:]:
        assert r["clients_ok"] == (K - 1 if outcome == "rejected" else K)
        assert r["metrics_normalized"] == (1 if outcome == "normalized" else 0)
    if outcome != "ok":  # clients = clients_per_round: the same client every round, one log line in all
        assert len(set(nodes)) == 1
        told = [r for r in caplog.records if "once per client" in r.getMessage()]
        assert len(told) == 1, [r.getMessage() for r in told]


@pytest.mark.parametrize("diagnostics", [False, True])
def test_rlc_reported_norm_from_one_client(diagnostics, caplog):
    """Without diagnostics one client reports update-norm unasked (dropped); with them one leaves it out
    (its peers report it: rejected)."""
    def drop_norm(reply, *_):
        del reply.content[keys.METRICS][keys.UPDATE_NORM]
        return reply

    cfg = cfg_for({"name": "rlc", "gain": 4, "diagnostics": diagnostics}, channel={"snr_db": 20.0, "fading": "none"})
    rows, _, _ = run_tampered(cfg, drop_norm if diagnostics else reported_norm, caplog)
    assert len(rows) == 3
    for r in rows[1:]:
        assert r["clients_ok"] == (K - 1 if diagnostics else K)
        assert r["metrics_normalized"] == (0 if diagnostics else 1)


def test_evaluate_replies_made_consistent():
    """Client-side evaluation (fraction_evaluate > 0): FedAvg's aggregate_evaluate has the same check."""
    s = FedAvgBaseline(clients_per_round=3, client_ids=range(3), seed=0)

    def reply(node, **m):
        msg = Message(RecordDict({"eval": MetricRecord({keys.NUM_EXAMPLES: 10, **m})}), dst_node_id=node,
                      message_type="evaluate")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    replies = [reply(1, loss=1.0), reply(2, loss=1.0, extra=3.0), reply(3, acc=0.5)]
    out = s.aggregate_evaluate(1, replies)
    # three layouts, one each: {n, loss} is contained in two of them, so node 2's extra goes and node 3 is left out
    assert dict(out) == {"loss": 1.0}


def test_agreed_layout_rule():
    a = layout(MetricRecord({"n": 1, "l": 0.5}))
    b = layout(MetricRecord({"n": 1, "l": 0.5, "x": 1.0}))
    assert agreed_layout([a, a, b]) == a
    assert agreed_layout([a, b]) == a  # a tie: the layout both replies contain
    assert agreed_layout([b, b, a]) == b
    kept, note = conform(MetricRecord({"n": 1, "l": 0.5, "x": 1.0}), a)
    assert dict(kept) == {"n": 1, "l": 0.5} and "x" in note
    kept, note = conform(MetricRecord({"n": 1}), a)
    assert kept is None and "'l'" in note
