"""OneBitCS defaults on a CNN: why classic error feedback diverges with the unbiased 1-bit decode, and
that the default (no error feedback, as Mitra & Khisti) trains LeNet-5."""

from __future__ import annotations

import math

import pytest
import torch

from fl_sim.compression import make_codec
from fl_sim.config import config_from_dict
from fl_sim.models import build_model
from fl_sim.strategies import OneBitCS
from fl_sim.testing import run_in_memory


def _lenet_update() -> torch.Tensor:
    torch.manual_seed(0)
    m = build_model("lenet5", (1, 8, 8), 10)
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]) * 0.01


def test_unbiased_onebit_decode_is_not_contractive_so_classic_ef_grows():
    # omega = E||x_hat - x||^2 / ||x||^2 of the default decode (M = d/4, recovery "none") on an update
    # shaped like LeNet-5 (d = 61,706). Classic EF r <- z - z_hat has E||r_{t+1}||^2 = omega ||r_t + x||^2,
    # so omega > 1 makes it grow geometrically. 10 dithers: omega's Monte-Carlo spread is a few percent,
    # far from the threshold 1 (measured 24).
    x = _lenet_update()
    d = x.numel()
    codec = make_codec("onebit_cs", dim=d, measurements=d // 4)
    omega = sum(float((codec.decode(codec.encode(x, seed=t, client_seed=0), seed=t, client_seed=0) - x)
                      .pow(2).sum() / x.pow(2).sum()) for t in range(10)) / 10
    assert omega > 10
    r = torch.zeros(d)
    for t in range(4):
        z = x + r
        r = z - codec.decode(codec.encode(z, seed=t, client_seed=0), seed=t, client_seed=0)
    assert float(r.norm()) > 100 * float(x.norm())  # sqrt(omega)^4 ~ 500


def test_onebit_refuses_classic_ef_with_the_unbiased_decode():
    assert OneBitCS().error_feedback == "none"  # the paper's (and the default's) choice
    with pytest.raises(ValueError, match="error_feedback='classic' with recovery='none' diverges"):
        OneBitCS(error_feedback="classic")
    assert OneBitCS(recovery="biht", error_feedback="classic").error_feedback == "classic"


def test_onebit_defaults_train_lenet5():
    # LeNet-5 on the embedded digits, the strategy with every default (M = d/4, one block, recovery
    # "none", server_lr 1): 4 rounds, every reply accepted by the norm guard, the test loss falls each round.
    # With classic error feedback (the earlier default) the guard rejected replies by round 3 and the test
    # loss rose (2.3043 -> 2.3184).
    cfg = config_from_dict({
        "name": "onebit_cnn", "seed": 0, "rounds": 4, "clients": 10, "clients_per_round": 5, "eval_every": 1,
        "data": {"name": "digits", "partition": "iid"}, "model": {"name": "lenet5"},
        "train": {"local_epochs": 2, "lr": 0.2, "batch_size": 32},
        "strategy": {"name": "onebit_cs"},
    })
    _, rows, strat = run_in_memory(cfg)
    assert strat.error_feedback == "none"
    losses = [r["test_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert all(r["clients_ok"] == 5 and r["clients_rejected"] == 0 for r in rows[1:])
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
