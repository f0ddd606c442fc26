"""Downlink: counted from the train messages' arrays; total (up + down) in metrics.csv and summary.json;
the sparse broadcast of a K-sparse server update, rebuilt bitwise by the clients."""

from __future__ import annotations

import csv
import json
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fl_sim.wire import keys
from fl_sim.clients.broadcast import rebuild, receive_model
from fl_sim.config import config_from_dict
from fl_sim.wire.records import flatten_arrays
from fl_sim.strategies import FedAvgBaseline
from fl_sim.strategies.broadcast import array_record_bits, sparse_changes
from fl_sim.testing import InMemoryGrid, run_in_memory

from test_strategy_base import initial, server_part, toy_app


def _cfg(strategy: dict, rounds: int = 3, **over) -> object:
    raw = {"name": "dl", "seed": 0, "rounds": rounds, "clients": 10, "clients_per_round": 5, "eval_every": 1,
           "data": {"name": "synthetic", "partition": "natural"}, "model": {"name": "mlp", "hidden": [32]},
           "train": {"lr": 0.1, "batch_size": 16}, "strategy": strategy}
    raw.update(over)
    return config_from_dict(raw)


def test_downlink_counts_every_array_of_every_train_message():
    # A method that gives each message an extra ArrayRecord (a per-client mask, say) broadcasts more than
    # the model: the count is read from the messages, per recipient.
    class WithMask(FedAvgBaseline):
        def finish_messages(self, server_round, arrays, messages):
            for i, m in enumerate(messages):
                m.content["mask"] = ArrayRecord({"m": Array(np.zeros(3 + i, np.float64))})
            return messages

    grid = InMemoryGrid(toy_app(), 10)
    s = WithMask(clients_per_round=4, client_ids=range(10), seed=3)
    msgs = list(s.configure_train(1, initial(), ConfigRecord(), grid))
    metrics = server_part(s.aggregate_train(1, grid.send_and_receive(msgs))[1])
    model_bits = 32 * 7  # initial(): 3 + 4 float32
    assert metrics["downlink_bits"] == 4 * model_bits + 64 * (3 + 4 + 5 + 6)
    assert metrics["total_bits"] == metrics["uplink_bits"] + metrics["downlink_bits"]


def test_federated_evaluation_messages_join_the_rounds_downlink():
    # Flower configures the evaluation after aggregate_train and before the round's row is recorded.
    grid = InMemoryGrid(toy_app(), 10)
    s = FedAvgBaseline(clients_per_round=4, client_ids=range(10), seed=3, fraction_evaluate=1.0,
                       min_evaluate_nodes=1, min_available_nodes=1)
    msgs = list(s.configure_train(1, initial(), ConfigRecord(), grid))
    s.aggregate_train(1, grid.send_and_receive(msgs))
    train_bits = s.last_metrics["downlink_bits"]
    evaluate = list(s.configure_evaluate(1, initial(), ConfigRecord(), grid))
    assert len(evaluate) == 10
    for row in (s.last_metrics, s.history[1]):
        assert row["downlink_eval_bits"] == 10 * 32 * 7
        assert row["downlink_bits"] == train_bits + 10 * 32 * 7
        assert row["total_bits"] == row["uplink_bits"] + row["downlink_bits"]


def test_metrics_csv_and_summary_report_downlink_and_total(tmp_path):
    summary, rows, _ = run_in_memory(_cfg({"name": "fedavg"}, rounds=2), tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    d = sum(p.size for p in (np.zeros(60 * 32), np.zeros(32), np.zeros(32 * 10), np.zeros(10)))
    for row in table[1:]:
        assert int(row["downlink_bits"]) == 5 * 32 * d  # 5 recipients of the float32 model
        assert int(row["total_bits"]) == int(row["uplink_bits"]) + int(row["downlink_bits"])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["total_downlink_bits"] == 2 * 5 * 32 * d
    assert on_disk["total_bits"] == on_disk["total_uplink_bits"] + on_disk["total_downlink_bits"]


def test_rebuild_from_changes_is_bitwise():
    # NaN payloads, -0.0 against 0.0, an integer buffer and an unchanged array all survive exactly.
    rng = np.random.default_rng(0)
    prev = {"w": rng.standard_normal((4, 5)).astype(np.float32), "n": np.array([3], np.int64),
            "b": rng.standard_normal(6).astype(np.float32)}
    prev["w"][0, 0] = 0.0
    new = {k: v.copy() for k, v in prev.items()}
    new["w"][0, 0] = -0.0  # equal to 0.0 as a number, another bit pattern
    new["w"][1, 2] += 1
    new["w"][3, 4] = np.float32("nan")
    new["n"][0] = 4
    rec_prev, rec_new = ArrayRecord({k: Array(v) for k, v in prev.items()}), ArrayRecord({k: Array(v) for k, v in new.items()})
    sparse = sparse_changes(rec_prev, rec_new)
    assert sparse["w.idx"].numpy().tolist() == [0, 7, 19] and sparse["b.idx"].numpy().size == 0
    assert array_record_bits(sparse) == 3 * (32 + 32) + (32 + 64)
    out = rebuild(rec_prev, sparse)
    for k in new:
        assert out[k].numpy().dtype == new[k].dtype
        assert out[k].numpy().tobytes() == new[k].tobytes()
    assert sparse_changes(rec_prev, ArrayRecord({"w": Array(new["w"])})) is None  # other arrays: dense


def _train_msg(version, base=None, sparse=None, model=None):
    cfg = ConfigRecord({keys.MODEL_VERSION: version})
    content = RecordDict({keys.CONFIG: cfg})
    if sparse is not None:
        cfg[keys.MODEL_BASE] = base
        content[keys.SPARSE_MODEL] = sparse
    else:
        content[keys.ARRAYS] = model
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)


def test_a_node_without_the_base_model_refuses_a_sparse_broadcast():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    w0 = ArrayRecord({"w": Array(np.arange(5, dtype=np.float32))})
    w1 = ArrayRecord({"w": Array(np.array([0, 1, 7, 3, 4], np.float32))})
    sparse = sparse_changes(w0, w1)
    with pytest.raises(ValueError, match="holds no model"):
        receive_model(_train_msg(2, base=1, sparse=sparse), ctx)
    assert receive_model(_train_msg(1, model=w0), ctx) == 1
    msg = _train_msg(2, base=1, sparse=sparse)
    assert receive_model(msg, ctx) == 2
    assert msg.content[keys.ARRAYS]["w"].numpy().tobytes() == w1["w"].numpy().tobytes()
    second = _train_msg(2, base=1, sparse=sparse)  # a second virtual client of the node, same round
    assert receive_model(second, ctx) == 2 and second.content[keys.ARRAYS]["w"].numpy().tolist() == [0, 1, 7, 3, 4]
    with pytest.raises(ValueError, match="version 2"):
        receive_model(_train_msg(4, base=3, sparse=sparse), ctx)


FETCHSGD = {"name": "fetchsgd", "rows": 5, "cols": 100, "k": 40, "momentum": 0.9, "server_lr": 0.3}


@pytest.mark.parametrize("method,backend", [
    (FETCHSGD, "inline"),
    (FETCHSGD, "vectorized"),  # the batched grid rebuilds the sparse models before batching
    ({"name": "fiht_cs", "compression": 4, "sparsity": 40}, "inline"),
])
def test_sparse_broadcast_is_exact_and_counts_the_changes(method, backend):
    # The same run with and without the sparse broadcast: identical test losses (every client trained from
    # the same model, bitwise) and final model; a node that took part in the previous round gets the K
    # changed entries (32-bit index + 32-bit value each), the others the full model.
    sim = {"simulation": {"backend": backend}}
    dense = run_in_memory(_cfg(dict(method), rounds=4, **sim))
    sparse = run_in_memory(_cfg({**method, "sparse_broadcast": True}, rounds=4, **sim))
    (_, rows_d, s_d), (_, rows_s, s_s) = dense, sparse
    assert [r["test_loss"] for r in rows_d] == [r["test_loss"] for r in rows_s]
    assert s_d._global_vector.numpy().tobytes() == s_s._global_vector.numpy().tobytes()
    d = s_s._global_vector.numel()
    for rnd in range(2, 5):
        r = rows_s[rnd]
        n_sparse = int(r["sparse_broadcasts"])
        assert 0 < n_sparse < 5  # some of the 5 nodes took part last round, not all
        changed = (r["downlink_bits"] - (5 - n_sparse) * 32 * d) / (64 * n_sparse)
        assert changed == int(changed) and 0 < changed <= 40  # at most K entries changed
        assert r["downlink_bits"] < rows_d[rnd]["downlink_bits"]
        assert r["total_bits"] == r["uplink_bits"] + r["downlink_bits"]
    assert "sparse_broadcasts" not in rows_d[2]


def test_fedavg_of_identical_models_leaves_a_sparse_update_sparse():
    # The inner FedAvg averages K copies of w + Δ; Flower's float32 accumulation Σ (n_i/n) w moved ~14% of
    # the entries by an ulp, so the next broadcast changed in far more than FetchSGD's K entries.
    from fl_sim.strategies import FetchSGD

    captured = []

    class Spy(FetchSGD):
        def configure_train(self, server_round, arrays, config, grid):
            captured.append(flatten_arrays(arrays))
            return super().configure_train(server_round, arrays, config, grid)

    cfg = _cfg({"name": "fetchsgd", "rows": 5, "cols": 100, "k": 40, "server_lr": 0.3}, rounds=2)
    from fl_sim.runs import build

    original = build.strategy_class
    build.strategy_class = lambda name: Spy if name == "fetchsgd" else original(name)
    try:
        _, _, s = run_in_memory(cfg)
    finally:
        build.strategy_class = original
    w0, w1 = captured
    assert s.history[1]["update_nnz"] == 40
    assert int((w1 != w0).sum()) == 40
