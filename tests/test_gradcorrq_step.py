"""GradCorrQ's step (Theorem 2's η ρ): Algorithm 1 stays unbiased and trains where the step as given diverges."""

from __future__ import annotations

import math

import pytest
import torch

from fl_sim.config import load_config, packaged_config
from fl_sim.strategies.daqusgd import gradcorrq_step_scale
from fl_sim.testing import run_in_memory

from test_daqusgd import _cfg, _one_round


def test_step_scale_is_the_ratio_of_lemma_1_deviation_bounds():
    # ρ = (2 + √d/(m−1)) / (2 + (h+1)√d/(m−1)); configs/daqusgd.yaml: h = 14,210, d = 60, 3 bits (m − 1 = 3)
    r = math.sqrt(60) / 3
    assert gradcorrq_step_scale(14_210, 60, 3) == pytest.approx((2 + r) / (2 + 14_211 * r), rel=1e-12)
    assert gradcorrq_step_scale(14_210, 60, 3) == pytest.approx(1.25e-4, rel=0.01)
    assert gradcorrq_step_scale(0, 60, 3) == pytest.approx(1.0)  # no correction term: the DataQ step
    with pytest.raises(ValueError, match="gradcorrq_step"):
        run_in_memory(_cfg({"gradcorrq": True, "gradcorrq_step": "half"}))


def test_the_step_scales_the_unbiased_gradient_and_nothing_else():
    # Same replies (seeded), momentum 0: the theorem2 update is exactly ρ times the update with the step as
    # given, so E[update] = -η ρ ∇L (the estimator's unbiasedness, tests/test_daqusgd.py, is untouched).
    base = {"quantizer": "exact", "levels": 8, "gradcorrq": True, "momentum": 0.0, "batch_size": 16, "c_z": 2.0}
    s1, *_, u_none, _ = _one_round(_cfg({**base, "gradcorrq_step": "none"}), threshold=-1.0)
    s2, *_, u_thm, _ = _one_round(_cfg(base), threshold=-1.0)
    rho = s2.last_metrics["gradcorrq_step_scale"]
    h = u_thm.numel()
    assert rho == pytest.approx(gradcorrq_step_scale(h, 60, 7))
    # the updates are read back as w_new - w in float32: a few ulps of the weights (|w| < 1: ulp <= 6e-8)
    torch.testing.assert_close(u_thm, rho * u_none, rtol=1e-4, atol=2e-7)
    assert float(u_none.abs().max()) * rho > 100 * 2e-7  # the tolerance is far below the update itself
    assert "gradcorrq_step_scale" not in s1.last_metrics


def test_daqusgd_config_with_gradcorrq_trains():
    # configs/daqusgd.yaml with gradcorrq: true, 3 rounds. With the step as given one sample's correction
    # moves a weight by η h b / N ≈ 17 and the test loss went 2.34 -> 708 -> 3128 -> 7486; with η ρ it falls
    # every round and stays finite (slowly: ρ = 1.25e-4, the cost of one bit per sample).
    cfg = load_config(packaged_config("daqusgd"), ["rounds=3", "strategy.gradcorrq=true"])
    _, rows, _ = run_in_memory(cfg)
    losses = [r["test_loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
