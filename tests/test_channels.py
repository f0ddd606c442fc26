"""fl_sim.channels: fading laws, noise conventions, CSI, participation, power control, MACChannel,
channel-use accounting and config errors ([Abdi-thesis] Ch. 5, docs/notes.md#rlc).

Monte-Carlo tolerances are derived in comments: standard error of the estimate x 5 (a fixed seed
makes each test deterministic; 5 sigma keeps the test valid for any seed with probability ~1 - 6e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from fl_sim.channels import (
    REAL_NOISE_FRACTION,
    ChannelError,
    MACChannel,
    PathLoss,
    analog_channel_uses,
    capacity_bits_per_use,
    compare_analog_digital,
    complex_awgn,
    data_weights,
    digital_channel_uses,
    draw_fading,
    draw_participation,
    estimate_csi,
    form_signals,
    latency_s,
    noise_std_from_snr,
    participation_scale,
    power_control,
    real_awgn,
    snr_db_to_linear,
)
from fl_sim.rng import torch_generator

# ---------------------------------------------------------------------------------------------
# fading


def test_rayleigh_power_is_exponential_and_seeded():
    h = draw_fading("rayleigh", 16, 256, seed=1, round=0)
    assert h.shape == (16, 256) and h.dtype == torch.complex64
    power = (h.abs() ** 2).flatten().double().numpy()
    assert scipy.stats.kstest(power, "expon").pvalue > 0.01  # |h|² ~ Exp(1)
    assert torch.equal(h, draw_fading("rayleigh", 16, 256, seed=1, round=0))
    assert not torch.equal(h, draw_fading("rayleigh", 16, 256, seed=2, round=0))


def test_rician_mean_power_and_k_factor():
    k_factor, n = 3.0, 64 * 4096
    h = draw_fading("rician", 64, 4096, seed=3, round=0, rician_k=k_factor).flatten().to(torch.complex128)
    mean = h.mean()
    var = ((h - mean).abs() ** 2).mean().item()
    # E[h] = sqrt(K/(K+1)) (LOS phase 0); Re and Im of the scatter have variance 1/(2(K+1)) each,
    # so the SE of each mean component is sqrt(1/(2(K+1)n)) = 6.9e-4; 5 SE = 3.5e-3.
    se_mean = math.sqrt(1 / (2 * (k_factor + 1) * n))
    assert abs(mean.real.item() - math.sqrt(k_factor / (k_factor + 1))) < 5 * se_mean
    assert abs(mean.imag.item()) < 5 * se_mean
    # E|h|² = 1; Var|h|² = (1 + 2K)/(K+1)² = 0.4375 -> SE = sqrt(0.4375/n) = 1.3e-3.
    se_pow = math.sqrt((1 + 2 * k_factor) / (k_factor + 1) ** 2 / n)
    assert abs((h.abs() ** 2).mean().item() - 1.0) < 5 * se_pow
    # K_hat = |mean|²/var: relative SE ~ sqrt((2 se_mean/|mu|)² + 1/n) = 2.6e-3 -> 5 SE = 1.3 %.
    rel_se = math.sqrt((2 * se_mean / math.sqrt(k_factor / (k_factor + 1))) ** 2 + 1 / n)
    assert abs(abs(mean.item()) ** 2 / var / k_factor - 1) < 5 * rel_se


def test_block_fading_is_constant_within_a_block_and_changes_across():
    draws = [draw_fading("rayleigh", 3, 8, seed=0, round=r, coherence_rounds=3) for r in range(7)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2])  # block 0: rounds 0-2
    assert torch.equal(draws[3], draws[5])  # block 1: rounds 3-5
    assert not torch.equal(draws[2], draws[3]) and not torch.equal(draws[5], draws[6])


def test_a_nodes_gains_do_not_depend_on_the_other_nodes_drawn():
    both = draw_fading("rician", [3, 7], 16, seed=5, round=2, rician_k=2.0)
    alone = draw_fading("rician", [7], 16, seed=5, round=2, rician_k=2.0)
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both[0], both[1])


def test_no_fading_and_path_loss_gains():
    pl = PathLoss(exponent=3.0, reference_distance=1.0, min_distance=2.0, max_distance=8.0)
    h = draw_fading("none", [0, 1, 2, 3], 5, seed=4, round=9, path_loss=pl)
    beta = pl.gains([0, 1, 2, 3], seed=4)
    d = pl.distances([0, 1, 2, 3], seed=4)
    assert bool(((d >= 2.0) & (d <= 8.0)).all())
    torch.testing.assert_close(beta, (1.0 / d) ** 3.0)
    torch.testing.assert_close((h.abs() ** 2).double(), beta[:, None].expand(4, 5), rtol=1e-5, atol=0)
    assert torch.equal(pl.distances([2], seed=4), d[2:3])  # drawn once per node, independent of the others


def test_fading_rejects_bad_arguments():
    with pytest.raises(ChannelError, match="unknown"):
        draw_fading("nakagami", 2, 4, seed=0, round=0)
    with pytest.raises(ChannelError, match="coherence_rounds"):
        draw_fading("rayleigh", 2, 4, seed=0, round=0, coherence_rounds=0)
    with pytest.raises(ChannelError, match="rician_k"):
        draw_fading("rician", 2, 4, seed=0, round=0, rician_k=-1.0)


# ---------------------------------------------------------------------------------------------
# noise


def test_complex_noise_variance_is_per_complex_dimension():
    var, n = 0.3, 200_000
    w = complex_awgn((n,), noise_var=var, generator=torch_generator(0, "t"), dtype=torch.complex128)
    # |w|² ~ var·Exp(1): SE of the mean = var/sqrt(n); Re² ~ (var/2)χ²₁: SE = (var/2)sqrt(2/n).
    assert abs((w.abs() ** 2).mean().item() - var) < 5 * var / math.sqrt(n)
    for part in (w.real, w.imag):
        assert abs((part**2).mean().item() - var / 2) < 5 * (var / 2) * math.sqrt(2 / n)
    assert abs((w.real * w.imag).mean().item()) < 5 * (var / 2) / math.sqrt(n)  # independent parts
    r = real_awgn((n,), noise_var=var, generator=torch_generator(1, "t"), dtype=torch.float64)
    assert abs((r**2).mean().item() - var) < 5 * var * math.sqrt(2 / n)
    silent = complex_awgn((3,), noise_var=0.0, generator=torch_generator(0))
    assert torch.equal(silent, torch.zeros(3, dtype=torch.complex64))


def test_snr_helpers():
    assert snr_db_to_linear(18.0) == pytest.approx(63.0957, rel=1e-5)  # thesis: P/σ² ≈ 63
    assert noise_std_from_snr(18.0, 2.0) == pytest.approx(math.sqrt(2.0 / 10**1.8))
    with pytest.raises(ChannelError):
        noise_std_from_snr(float("nan"), 1.0)
    with pytest.raises(ChannelError):
        noise_std_from_snr(10.0, 0.0)


def test_transmit_noise_matches_snr_and_noiseless_path_is_exact():
    ch = MACChannel(snr_db=10.0, power=2.0, fading="none")
    assert ch.noise_var == pytest.approx(0.2)
    n = 100_000
    y = ch.transmit(torch.zeros(1, n), torch.ones(1, n, dtype=torch.complex64), round=0)
    # y = η ~ CN(0, 0.2): SE of mean |η|² = 0.2/sqrt(n), of mean Re² = 0.1 sqrt(2/n).
    assert abs((y.abs() ** 2).double().mean().item() - 0.2) < 5 * 0.2 / math.sqrt(n)
    assert abs((y.real**2).double().mean().item() - REAL_NOISE_FRACTION * 0.2) < 5 * 0.1 * math.sqrt(2 / n)
    # noiseless: y = Σ_i h_i ⊙ x_i exactly (hand computed)
    quiet = MACChannel(snr_db=None)
    h = torch.tensor([[1, 1j], [2, -1]], dtype=torch.complex64)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(quiet.transmit(x, h, round=0), torch.tensor([7, -4 + 2j], dtype=torch.complex64))
    with pytest.raises(ChannelError, match="shape"):
        quiet.transmit(torch.zeros(3, 2), h, round=0)
    with pytest.raises(ChannelError, match="finite"):
        quiet.transmit(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]), h, round=0)


# ---------------------------------------------------------------------------------------------
# CSI and participation


def test_imperfect_csi_error_variance():
    h = draw_fading("rayleigh", 8, 10_000, seed=0, round=0)
    assert estimate_csi(h, mode="perfect", seed=0, round=0, nodes=8) is h
    h_est = estimate_csi(h, mode="imperfect", error_var=0.05, seed=0, round=0, nodes=8)
    e2 = ((h_est - h).abs() ** 2).double()
    assert abs(e2.mean().item() - 0.05) < 5 * 0.05 / math.sqrt(e2.numel())  # |e|² ~ 0.05·Exp(1)
    with pytest.raises(ChannelError, match="csi_error_var"):
        estimate_csi(h, mode="imperfect", error_var=-1.0, seed=0, round=0, nodes=8)


def test_participation_frequency_scale_and_weights():
    rounds, pi = 2000, torch.tensor([0.2, 0.5, 0.9])
    b = torch.stack([draw_participation(pi, seed=1, round=r, nodes=[4, 5, 6]) for r in range(rounds)])
    freq = b.double().mean(0)
    se = torch.sqrt(pi.double() * (1 - pi.double()) / rounds)  # binomial SE
    assert bool(((freq - pi).abs() < 5 * se).all())
    alone = torch.stack([draw_participation(0.5, seed=1, round=r, nodes=[5]) for r in range(50)])
    assert torch.equal(alone[:, 0], b[:50, 1])  # node 5's coin does not depend on the others
    expected_scale = torch.tensor([5.0, 0.0, 1 / 0.9], dtype=torch.float64)
    torch.testing.assert_close(participation_scale(torch.tensor([1, 0, 1]), pi), expected_scale)
    torch.testing.assert_close(data_weights([10, 30, 60]), torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64))
    with pytest.raises(ChannelError, match=r"\(0, 1\]"):
        draw_participation(torch.tensor([0.0, 1.0]), seed=0, round=0, nodes=2)
    with pytest.raises(ChannelError):
        data_weights([0, 0])


# ---------------------------------------------------------------------------------------------
# power control (eqs. 5.6-5.9)

# Hand case, m = 4, budgets P = 4, amplitudes a = 1.
# node 0: |ĥ| = (0.5, 2, 0.1, 1) -> strongest first 1/|h|² = (0.25, 1, 4, 100), S_k = (0.25, 1.25, 5.25, 105.25)
#         c_0(k)² = P k²/(m a² S_k) = k²/S_k = (4, 3.2, 12/7, 0.152)
# node 1: |ĥ| = 1 -> S_k = k, c_1(k)² = k = (1, 2, 3, 4)
# For a candidate c each node uses max{k : c_i(k) >= c} and c' = min_i c_i(m_i):
#   m_0 = 1 -> c' = 2, m_0 = 2 -> c'² = 3.2, m_0 = 3 -> c'² = 12/7, m_0 = 4 -> c'² = 16/105.25 (m_1 = 4 always).
# (5.9)/d = (Σ a_i/m_i)(Σ a_i) + σ_R²/c'²: with σ_R² = 1: 2.75, 1.8125, 1.75, 7.58 -> m_0 = 3, c² = 12/7;
# with σ_R² = 0 the first term alone -> m_0 = 4; with σ_R² = 1000 the noise term -> m_0 = 1, c = 2.
_H_HAND = torch.tensor(
    [[0.5j, -2.0, 0.1, (1 + 1j) / math.sqrt(2)], [1.0, -1.0, 1j, -1j]], dtype=torch.complex64
)


def test_power_control_hand_case():
    plan = power_control(_H_HAND, torch.ones(2), torch.full((2,), 4.0), noise_var=1.0)
    c, mask, q, m_i, expected = plan  # NamedTuple unpacking
    assert c == pytest.approx(math.sqrt(12 / 7), rel=1e-6)  # complex64 gains: 0.1 is inexact
    assert m_i.tolist() == [3, 4]
    assert mask.tolist() == [[True, True, False, True], [True, True, True, True]]
    torch.testing.assert_close(q[0], torch.where(mask[0], 1 / _H_HAND[0], 0))
    torch.testing.assert_close(q[1], 1 / _H_HAND[1])
    # (5.8): m c² a² ‖q‖²/m_i²: node 0 binding (= P), node 1 = 4·(12/7)·4/16
    torch.testing.assert_close(expected, torch.tensor([4.0, 12 / 7], dtype=torch.float64))
    torch.testing.assert_close(expected, 4 * c**2 * (q.abs().double() ** 2).sum(1) / m_i.double() ** 2)


def test_power_control_noise_level_moves_the_selection():
    quiet = power_control(_H_HAND, torch.ones(2), torch.full((2,), 4.0), noise_var=0.0)
    assert quiet.m_i.tolist() == [4, 4] and quiet.c == pytest.approx(math.sqrt(16 / 105.25))
    loud = power_control(_H_HAND, torch.ones(2), torch.full((2,), 4.0), noise_var=1e3)
    assert loud.m_i.tolist() == [1, 4] and loud.c == pytest.approx(2.0)
    every = power_control(_H_HAND, torch.ones(2), torch.full((2,), 4.0), noise_var=1e3, policy="all")
    assert every.m_i.tolist() == [4, 4] and every.c == pytest.approx(math.sqrt(16 / 105.25))


def test_power_control_selection_is_maximal_and_c_is_the_largest_feasible():
    n, m = 6, 32
    h = draw_fading("rayleigh", n, m, seed=11, round=0)
    a = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5, 0.7], dtype=torch.float64)
    budget = torch.tensor([32.0, 16.0, 64.0, 32.0, 8.0, 32.0], dtype=torch.float64)
    plan = power_control(h, a, budget, noise_var=0.05)
    assert plan.m_i[3] == 0 and not bool(plan.mask[3].any()) and plan.expected_power[3] == 0  # a = 0 sends nothing
    assert bool((plan.expected_power <= budget * (1 + 1e-12)).all())
    assert (plan.expected_power / budget).max().item() == pytest.approx(1.0)  # some node binds: c is maximal
    inv = np.sort(1.0 / (h.to(torch.complex128).abs().numpy() ** 2), axis=1)  # strongest first
    for i in np.flatnonzero(a.numpy() > 0):  # brute force: the largest k with (5.8) <= P_i at this c
        power_k = [m * plan.c**2 * a[i].item() ** 2 * inv[i, :k].sum() / k**2 for k in range(1, m + 1)]
        feasible = [k for k in range(1, m + 1) if power_k[k - 1] <= budget[i].item() * (1 + 1e-12)]
        assert plan.m_i[i].item() == max(feasible)
        strongest = np.argsort(-h[i].abs().numpy(), kind="stable")[: plan.m_i[i].item()]
        assert sorted(np.flatnonzero(plan.mask[i].numpy()).tolist()) == sorted(strongest.tolist())


def test_power_control_degenerate_inputs():
    h = draw_fading("rayleigh", 3, 8, seed=0, round=0)
    nothing = power_control(h, torch.zeros(3), torch.ones(3))
    assert nothing.c == 0.0 and nothing.m_i.tolist() == [0, 0, 0] and not bool(nothing.q.abs().any())
    tiny = power_control(h * 1e-15, torch.tensor([1e-20, 1e20, 1.0]), torch.ones(3), noise_var=1.0)
    assert math.isfinite(tiny.c) and tiny.c > 0
    assert bool(torch.isfinite(torch.view_as_real(tiny.q)).all() & torch.isfinite(tiny.expected_power).all())
    with pytest.raises(ChannelError, match="policy"):
        power_control(h, torch.ones(3), torch.ones(3), policy="max")
    with pytest.raises(ChannelError, match="budgets"):
        power_control(h, torch.ones(3), -torch.ones(3))


# ---------------------------------------------------------------------------------------------
# MACChannel end to end


def test_over_the_air_noiseless_no_fading_returns_the_weighted_sum():
    ch = MACChannel(snr_db=None, fading="none")
    v = torch.randn(4, 64, generator=torch_generator(0, "v"))
    alpha = data_weights([1, 2, 3, 4])
    y, metrics = ch.over_the_air(v, alpha, round=3, node_ids=[10, 11, 12, 13])
    torch.testing.assert_close(y, (alpha.float()[:, None] * v).sum(0), rtol=1e-5, atol=1e-6)
    assert y.shape == (64,) and y.dtype == torch.float32
    assert metrics["transmitting"] == 4.0 and metrics["mean_m_i"] == 64.0 and metrics["channel_uses"] == 64.0
    assert metrics["expected_power_ratio_max"] == pytest.approx(1.0)


def test_over_the_air_noiseless_fading_sums_the_selected_subchannels():
    ch = MACChannel(snr_db=None, fading="rayleigh", power_policy="all")
    v = torch.randn(3, 32, generator=torch_generator(1, "v"), dtype=torch.float64)
    alpha = torch.tensor([0.2, 0.3, 0.5])
    y, metrics = ch.over_the_air(v, alpha, round=0)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, (alpha.double()[:, None] * v).sum(0), rtol=1e-5, atol=1e-6)  # h ⊙ q = 1
    # "mse" policy with a noisy channel drops weak subchannels: y = Σ α_i (m/m_i) 1_{S_i} ⊙ v_i + η/c
    sel = MACChannel(snr_db=0.0, fading="rayleigh")
    y2, met2 = sel.over_the_air(v, alpha, round=0)
    assert met2["mean_m_i"] < 32
    assert math.isfinite(met2["decoded_noise_var"]) and met2["decoded_noise_var"] > 0


def test_over_the_air_degenerate_and_bad_inputs():
    ch = MACChannel(snr_db=10.0, participation=0.5)
    y, metrics = ch.over_the_air(torch.zeros(3, 16), torch.ones(3) / 3, round=0)
    assert torch.equal(y, torch.zeros(16)) and metrics["c"] == 0.0  # zero in, zero out
    y16, _ = ch.over_the_air(torch.randn(3, 16).half(), torch.ones(3) / 3, round=1)
    assert y16.dtype == torch.float32 and bool(torch.isfinite(y16).all())
    with pytest.raises(ChannelError, match="NaN"):
        ch.over_the_air(torch.full((2, 4), float("nan")), torch.ones(2), round=0)
    with pytest.raises(ChannelError, match="weights"):
        ch.over_the_air(torch.ones(2, 4), torch.tensor([1.0, -1.0]), round=0)
    with pytest.raises(ChannelError, match="node_ids"):
        ch.over_the_air(torch.ones(2, 4), torch.ones(2), round=0, node_ids=[1, 2, 3])
    per_node = MACChannel(power=[1.0, 2.0])
    with pytest.raises(ChannelError, match="node 5"):
        per_node.over_the_air(torch.ones(2, 4), torch.ones(2), round=0, node_ids=[0, 5])


@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_over_the_air_is_scale_equivariant_at_tiny_and_huge_magnitudes(scale):
    # c ∝ 1/‖v‖ (power control fills the same budget), so the noise in y/c scales with the input too
    ch = MACChannel(snr_db=10.0, participation=0.7)
    v = torch.randn(4, 32, generator=torch_generator(3, "v"))
    y1, m1 = ch.over_the_air(v, torch.full((4,), 0.25), round=2)
    ys, ms = ch.over_the_air(v * scale, torch.full((4,), 0.25), round=2)
    assert bool(torch.isfinite(ys).all())
    torch.testing.assert_close(ys / scale, y1, rtol=1e-4, atol=1e-6)
    assert ms["c"] * scale == pytest.approx(m1["c"], rel=1e-6) and torch.equal(ms["m_i"], m1["m_i"])


def test_downlink_noise_variance_and_noiseless_copies():
    x = torch.randn(50_000, generator=torch_generator(2, "x"), dtype=torch.float64)
    assert torch.equal(MACChannel().downlink(x, [1, 2], round=0), torch.stack([x, x]))
    ch = MACChannel(downlink_snr_db=10.0)
    out = ch.downlink(x, [1, 2], round=0)
    var = (x**2).mean().item() / 10.0  # σ_dl² = mean(x²)/SNR; SE of the mean of e² = var sqrt(2/n)
    for row in out:
        assert abs(((row - x) ** 2).mean().item() - var) < 5 * var * math.sqrt(2 / x.numel())
    assert not torch.equal(out[0], out[1])
    assert torch.equal(ch.downlink(x, [2], round=0)[0], out[1])  # node 2's noise is its own
    assert torch.equal(ch.downlink(torch.zeros(5), [1], round=0), torch.zeros(1, 5))


# ---------------------------------------------------------------------------------------------
# accounting (thesis §5.5, Fig. 5.3 text)


def test_channel_use_arithmetic_reproduces_the_thesis():
    assert capacity_bits_per_use(18.0) == pytest.approx(3.0, abs=2e-3)  # "C = 3 bits per symbol"
    out = compare_analog_digital(10**6, 50, 18.0, digital_gain=30, analog_gain=20)
    assert out["digital_bits"] == pytest.approx(53.3e6, rel=1e-3)  # "approximately 53e6"
    assert round(out["digital_channel_uses"] / 1e5) / 10 == 17.8  # "17.8e6 channel uses"
    assert out["analog_channel_uses"] == 50_000  # "only 50e3 channel uses"
    assert 350 <= out["ratio"] < 356  # "a factor of at least 350" (docs/notes.md#rlc-channel-uses: 355.6)
    assert analog_channel_uses(50_000, n_nodes=1000) == 50_000  # independent of the node count
    assert digital_channel_uses([3, 4, 0], 18.0) == 1 + 2 + 0  # ⌈bits/C⌉ per node, C = 3.001
    assert latency_s(50_000, 1e6, compute_s=0.5) == pytest.approx(0.55)
    with pytest.raises(ChannelError):
        latency_s(10, 0.0)


# ---------------------------------------------------------------------------------------------
# configuration


def test_from_config_accepts_known_keys_and_seed_default():
    ch = MACChannel.from_config({"snr_db": 5, "fading": "rician", "rician_k": 4.0, "participation": [0.5, 1.0]}, seed=7)
    assert ch.seed == 7 and ch.participation == (0.5, 1.0)
    assert MACChannel.from_config({"seed": 3}, seed=7).seed == 3
    assert MACChannel.from_config({"path_loss_exponent": 2.0, "max_distance": 4.0}).path_loss.exponent == 2.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"snr": 10}, r"unknown key 'snr'; allowed keys: snr_db, fading"),
        ({"csi_error_var": -0.1}, "csi_error_var"),
        ({"participation": 0.0}, r"\(0, 1\]"),
        ({"participation": 1.5}, r"\(0, 1\]"),
        ({"participation": [0.5, -1]}, r"\(0, 1\]"),
        ({"fading": "awgn"}, "fading='awgn' is unknown"),
        ({"csi": "partial"}, "csi='partial' is unknown"),
        ({"power": 0.0}, "power"),
        ({"coherence_rounds": 0}, "coherence_rounds"),
        ({"snr_db": float("inf")}, "snr_db"),
        ({"power_policy": "greedy"}, "power_policy"),
        ({"path_loss_exponent": 3.0, "min_distance": 5.0, "max_distance": 1.0}, "min_distance"),
    ],
)
def test_from_config_rejects_bad_keys_and_values(config, message):
    with pytest.raises(ValueError, match=message):
        MACChannel.from_config(config)


def test_form_signals_shape_check():
    plan = power_control(_H_HAND, torch.ones(2), torch.full((2,), 4.0))
    assert form_signals(torch.ones(7, 2, 4), torch.ones(2), plan).shape == (7, 2, 4)
    with pytest.raises(ChannelError, match="codewords"):
        form_signals(torch.ones(3, 4), torch.ones(3), plan)
