"""Abdi's RLC over the MAC checked against the thesis' Lemmas ([Abdi-thesis] Ch. 5; docs/notes.md#rlc).

Encoder A = H R / sqrt(m) (eq. 5.3). Lemma 13 uses fl_sim.compression.projections.PartialHadamard, one
seed per trial. The other Monte-Carlo tests use a batched dense copy (_RandomA): H = the first m rows
of the d x d Sylvester Hadamard matrix (H Hᵀ = d I), R = diag(r), one Rademacher r per trial. The
thesis' expectation is over A; with H fixed the expectation over r alone already gives the exact
formulas, because A Aᵀ = (d/m) I and E_r[Aᵀ D A] = (tr D/m) I for any diagonal D.
Decoder ĝ = (1/c) Aᵀ Re(y) (eq. 5.4 / Lemma 14); the in-phase decoder keeps σ_R² = σ²/2 of CN(0, σ²)
noise (fl_sim.channels.mac), so the noise term of (5.5) is d σ²/2 here.

Every trial is independent (its own A and its own noise row), so Monte-Carlo means are compared
with the formulas by a z-test: |mean − formula| <= 5 · sample std / sqrt(T) (5 standard errors; for
vectors, per coordinate: with d = 256 coordinates the chance of a false alarm is ~256 · 6e-7).
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from fl_sim.channels import (
    REAL_NOISE_FRACTION,
    MACChannel,
    data_weights,
    draw_participation,
    form_signals,
    power_control,
)
from fl_sim.compression.projections import PartialHadamard
from fl_sim.rng import torch_generator

D, M = 256, 64


class _RandomA:
    """T independent encoders A_t = H diag(r_t) / sqrt(m) applied in batch (float64)."""

    def __init__(self, trials: int, seed: int) -> None:
        self.h = torch.tensor(scipy.linalg.hadamard(D)[:M], dtype=torch.float64)  # (m, d)
        gen = torch_generator(seed, "rademacher")
        self.r = torch.randint(0, 2, (trials, D), generator=gen).to(torch.float64) * 2 - 1

    def encode(self, g: torch.Tensor) -> torch.Tensor:
        """A_t g_i for every trial t and node i: (K, d) -> (T, K, m)."""
        return (self.r[:, None, :] * g[None]) @ self.h.T / math.sqrt(M)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """A_tᵀ y_t: (T, m) -> (T, d)."""
        return self.r * (y @ self.h) / math.sqrt(M)


def _gradients(k: int, seed: int) -> torch.Tensor:
    """k correlated local gradients with different norms (a shared part + a node part)."""
    gen = torch_generator(seed, "g")
    shared = torch.randn(D, generator=gen, dtype=torch.float64)
    own = torch.randn(k, D, generator=gen, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, k, dtype=torch.float64)[:, None]
    return scale * (0.6 * shared + own) / math.sqrt(D)


def _assert_z(samples: torch.Tensor, expected: torch.Tensor | float, what: str) -> None:
    """|mean − expected| <= 5 SE per entry, SE = sample std / sqrt(T) (trials along dim 0)."""
    t = samples.shape[0]
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(t)
    z = ((mean - expected) / se).abs().max().item()
    assert z < 5, f"{what}: mean {mean} vs {expected}, z = {z:.2f}"


def test_lemma13_mse_and_unbiasedness_with_partial_hadamard():
    # Prepare: 4 nodes, no fading, everyone transmits, c = 1: x_i = α_i A g_i (eq. 5.2), one A per seed
    trials = 1000
    g_i = _gradients(4, seed=0)
    alpha = data_weights([1, 2, 3, 4])
    g = alpha @ g_i
    ch = MACChannel(snr_db=16.0, power=1.0, fading="none")
    sigma2 = ch.noise_var  # per complex dimension
    ops = [PartialHadamard(D, M, seed=t) for t in range(trials)]  # A = H R / sqrt(m), eq. (5.3)
    # Execute
    x = alpha[None, :, None] * torch.stack([op.forward(g_i) for op in ops])  # (T, K, m)
    y = ch.transmit(x, torch.ones(4, M, dtype=torch.complex128), round=0)  # (T, m)
    g_hat = torch.stack([op.adjoint(y_t) for op, y_t in zip(ops, y.real)])  # ĝ = Aᵀ Re(y), eq. (5.4)
    err = ((g_hat - g) ** 2).sum(1)
    # Assert: (5.5) with σ² -> σ_R² = σ²/2; unbiased per coordinate
    lemma13 = (D / M - 1) * g.pow(2).sum() + D * REAL_NOISE_FRACTION * sigma2
    _assert_z(err, lemma13, "Lemma 13 MSE")
    _assert_z(g_hat, g, "Lemma 13 mean")
    # the test has the power to tell the constant: d σ² (full complex variance) is rejected
    se = err.std() / math.sqrt(trials)
    assert abs(err.mean() - (lemma13 + D * sigma2 / 2)) > 5 * se


def test_batched_dense_encoder_matches_partial_hadamard_algebra():
    # _RandomA (used below for speed) has the algebra the exact formulas rest on, like PartialHadamard:
    # A Aᵀ = (d/m) I (H Hᵀ = d I) and diag(AᵀA) = 1 for every A (so E_r[Aᵀ D A] = (tr D/m) I).
    eye = torch.eye(D, dtype=torch.float64)
    dense = _RandomA(3, seed=7).encode(eye).transpose(1, 2)  # (3, m, d): A_t
    ph = PartialHadamard(D, M, seed=0).forward(eye).T.to(torch.float64)
    for mat in (*dense, ph):
        assert (mat @ mat.T - D / M * torch.eye(M, dtype=torch.float64)).abs().max() < 1e-9
        assert ((mat * mat).sum(0) - 1).abs().max() < 1e-9


def test_lemma14_power_control_unbiased_bounded_and_within_budget():
    # Prepare: 5 nodes, Rayleigh fading, subchannel selection and global c (eqs. 5.6-5.8)
    trials, k = 4000, 5
    g_i = _gradients(k, seed=2)
    alpha = data_weights([5, 10, 20, 25, 40])
    g = alpha @ g_i
    amplitude = alpha * g_i.norm(dim=1)  # a_i = α_i ‖g_i‖
    # per-node budgets p_i ∝ a_i² (mean 1, so σ² = 1/SNR) put every node near its limit at -5 dB
    ch = MACChannel(snr_db=-5.0, power=tuple((amplitude**2 / (amplitude**2).mean()).tolist()), fading="rayleigh")
    h = ch.draw(k, M, round=0)
    budget = ch.budgets(k, M)
    sigma_r2 = REAL_NOISE_FRACTION * ch.noise_var
    plan = power_control(h, amplitude, budget, noise_var=sigma_r2)
    assert int((plan.m_i < M).sum()) >= 3  # the selection is exercised on several nodes (different S_i)
    a = _RandomA(trials, seed=3)
    # Execute: x_i = c α_i (m/m_i)(q_i ⊙ A g_i), y = Σ h_i ⊙ x_i + η, ĝ = Aᵀ Re(y) / c
    x = form_signals(a.encode(g_i), alpha, plan)  # (T, K, m) complex128
    y = ch.transmit(x, h, round=0)
    g_hat = a.decode(y.real) / plan.c
    err = ((g_hat - g) ** 2).sum(1)
    # Assert: unbiased; MSE = exact value (docs/notes.md#rlc-lemma14) <= bound (5.9); E‖x_i‖² = (5.8) <= P_i
    _assert_z(g_hat, g, "Lemma 14 mean")
    mask = plan.mask.to(torch.float64)
    overlap = mask @ mask.T  # |S_i ∩ S_j|
    mi = plan.m_i.to(torch.float64)
    noise = D * sigma_r2 / plan.c**2
    exact = (alpha[:, None] * alpha[None, :] * D * overlap / (mi[:, None] * mi[None, :]) * (g_i @ g_i.T)).sum()
    exact = exact - g.pow(2).sum() + noise
    bound = (D / mi * amplitude).sum() * amplitude.sum() - g.pow(2).sum() + noise  # (5.9), norms not squared
    _assert_z(err, exact, "Lemma 14 exact MSE")
    assert exact < bound and err.mean() < bound
    power = (x.abs() ** 2).sum(-1)  # (T, K) realized ‖x_i‖²
    _assert_z(power, plan.expected_power, "eq. 5.8 power")
    assert bool((plan.expected_power <= budget * (1 + 1e-12)).all())


def test_participation_with_inverse_probability_scaling_is_unbiased():
    # Prepare: c = 1, every subchannel, no fading, x_i = α_i (b_i/π_i) A g_i (eq. 5.10)
    trials, k = 3000, 5
    g_i = _gradients(k, seed=4)
    alpha = data_weights([3, 1, 4, 1, 5])
    pi = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    g = alpha @ g_i
    ch = MACChannel(snr_db=20.0, fading="none", participation=tuple(pi.tolist()))
    b = torch.stack([draw_participation(pi, seed=ch.seed, round=t, nodes=k) for t in range(trials)])
    a = _RandomA(trials, seed=5)
    # Execute
    x = (alpha * b / pi)[:, :, None] * a.encode(g_i)
    y = ch.transmit(x, torch.ones(k, M, dtype=torch.complex128), round=0)
    g_hat = a.decode(y.real)
    err = ((g_hat - g) ** 2).sum(1)
    # Assert: docs/notes.md#rlc-participation (derived) MSE = (d/m)[‖g‖² + Σ(1/π_i − 1)α_i²‖g_i‖²] − ‖g‖² + d σ_R²
    spread = ((1 / pi - 1) * alpha**2 * g_i.pow(2).sum(1)).sum()
    formula = D / M * (g.pow(2).sum() + spread) - g.pow(2).sum() + D * REAL_NOISE_FRACTION * ch.noise_var
    _assert_z(g_hat, g, "participation mean")
    _assert_z(err, formula, "participation MSE")


@pytest.mark.parametrize("csi", ["perfect", "imperfect"])
def test_over_the_air_is_the_composition_of_the_pieces(csi):
    # over_the_air must be exactly: draw h, estimate ĥ, draw b, power control, form x, transmit, Re(y)/c
    ch = MACChannel(snr_db=12.0, fading="rician", rician_k=2.0, participation=0.6, csi=csi, csi_error_var=0.02,
                    path_loss_exponent=2.0, max_distance=3.0, seed=9)
    ids, rnd = [4, 8, 15, 16, 23, 42], 7
    v = torch.randn(len(ids), M, generator=torch_generator(0, "v"))
    alpha = data_weights([1, 2, 3, 4, 5, 6])
    norms = torch.linspace(1.0, 3.0, len(ids), dtype=torch.float64)
    y_dec, metrics = ch.over_the_air(v, alpha, round=rnd, node_ids=ids, norms=norms)

    h = ch.draw(ids, M, round=rnd)
    h_est = ch.estimate(h, ids, round=rnd)
    pi = ch.probabilities(ids)
    b = draw_participation(pi, seed=ch.seed, round=rnd, nodes=ids)
    coef = alpha * b / pi
    plan = power_control(h_est, coef * norms, ch.budgets(ids, M), noise_var=ch.noise_var / 2)
    y = ch.transmit(form_signals(v, coef, plan), h, round=rnd)
    assert torch.equal(y_dec, (y.real.double() / plan.c).float())
    assert metrics["c"] == plan.c and torch.equal(metrics["b"], b) and torch.equal(metrics["m_i"], plan.m_i)
    assert metrics["transmitting"] == float(b.sum()) and 0 < metrics["transmitting"] < len(ids)
