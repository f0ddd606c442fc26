"""Flower's robust aggregators as inner strategies of fl-sim's methods.

With methods that decode each reply, the wrapper hands the inner strategy one model per client, so
FedMedian, FedTrimmedAvg and Krum aggregate them as they would plain FedAvg replies: one client far
from the others does not move the coordinate-wise median, is trimmed, or is never Krum's choice.

Toy clients: node p returns w + (p + 1) per coordinate (p = 0..3), the attacker (p = 4) w + 1000.
fl-sim's own norm guard (fl_sim.strategies.guards, on by default) would reject the attacker before the
inner sees it; it is off here (``NO_GUARD``) so that these tests show the inner's robustness.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from fl_sim.clients import compression_mod
from fl_sim.wire.records import flatten_arrays
from fl_sim.strategies import QCS, CompressedFedAvg
from fl_sim.testing import InMemoryGrid

N, D = 5, 64
NO_GUARD = {"norm_bound": None}  # the inner, not fl-sim's norm guard, must stop the attacker


def toy_app() -> ClientApp:
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        p = int(context.node_config["partition-id"])
        shift = 1000.0 if p == N - 1 else p + 1.0
        out = ArrayRecord({k: Array(a.numpy() + np.float32(shift)) for k, a in msg.content["arrays"].items()})
        metrics = MetricRecord({"num-examples": 10, "train_loss": 0.5})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    return app


def one_round(strategy) -> torch.Tensor:
    grid = InMemoryGrid(toy_app(), N)
    arrays = ArrayRecord({"w": Array(np.zeros(D, np.float32))})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    new, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    assert new is not None
    return flatten_arrays(new)


@pytest.mark.parametrize("inner, honest", [
    (FedMedian(fraction_train=1.0), {3.0}),  # median of 1, 2, 3, 4 and the attacker
    (FedTrimmedAvg(fraction_train=1.0, beta=0.2), {3.0}),  # one trimmed at each end: mean of 2, 3, 4
    (Krum(fraction_train=1.0, num_malicious_nodes=1), {1.0, 2.0, 3.0, 4.0}),  # one of the honest models
])
def test_robust_inner_ignores_the_outlier(inner, honest):
    got = one_round(CompressedFedAvg(inner, codec="identity", guards=NO_GUARD))
    assert torch.allclose(got, torch.full((D,), float(got[0])), atol=1e-5)
    assert any(abs(float(got[0]) - h) < 1e-4 for h in honest), float(got[0])


def test_robust_inner_under_a_lossy_method():
    """QCS decodes each reply (per-reply reconstruction), so FedMedian sees one model per client."""
    got = one_round(QCS(FedMedian(fraction_train=1.0), block=64, k=32, levels=4, error_feedback="none",
                         guards=NO_GUARD))
    assert torch.isfinite(got).all()
    assert float(got.mean()) < 10.0  # FedAvg's mean would be (1 + 2 + 3 + 4 + 1000) / 5 = 202
