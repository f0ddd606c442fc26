"""Error feedback: classic EF, Abdi's weighted EF (eq. 4.14, Lemma 9, Remark 3), Tang's server EF.

The Lemma 9 simulation runs C independent chains at once: QCS is blockwise with independent randomness
per block and EF is elementwise, so the C blocks of one vector are C independent EF chains.
"""

import math

import pytest
import torch

from fl_sim.compression import CodecError, make_codec
from fl_sim.compression.error_feedback import (
    ErrorFeedback,
    ServerErrorFeedback,
    WeightedErrorFeedback,
    optimal_beta,
    residual_bound,
)
from fl_sim.compression.quantizers import topk_sparsify, scatter_dense
from fl_sim.rng import torch_generator


def test_classic_ef_hand_example():
    ef = ErrorFeedback()
    g = torch.tensor([1.0, -2.0, 0.5])
    z = ef.compensate(g, None)
    assert z is g  # r_0 = 0
    r = ef.update(None, z, torch.tensor([0.0, -2.0, 0.0]))
    assert r.tolist() == [1.0, 0.0, 0.5]
    assert ef.compensate(g, r).tolist() == [2.0, -2.0, 1.0]
    assert ef.compensate(g, r.to(torch.float16)).dtype == torch.float32  # fp16-stored residuals


def test_weighted_ef_hand_example_eq_4_14():
    ef = WeightedErrorFeedback(beta=0.25)
    g = torch.tensor([4.0, 0.0])
    r = torch.tensor([8.0, -4.0])
    z = ef.compensate(g, r)  # z = g + beta r
    assert z.tolist() == [6.0, -1.0]
    z_hat = torch.tensor([5.0, 0.0])
    # r' = (1 - beta) r + (z - z_hat) = [6, -3] + [1, -1]
    assert ef.update(r, z, z_hat).tolist() == [7.0, -4.0]
    assert ef.update(None, z, z_hat).tolist() == [1.0, -1.0]


def test_errors_are_clear():
    for bad in (0, -0.1, 1.5, True, "1"):
        with pytest.raises(CodecError, match=r"beta must be in \(0, 1\]"):
            WeightedErrorFeedback(beta=bad)
    with pytest.raises(CodecError, match="shapes"):
        ErrorFeedback().compensate(torch.zeros(3), torch.zeros(4))
    with pytest.raises(CodecError, match="alpha"):
        optimal_beta(2.0, "best")
    with pytest.raises(CodecError, match="min\\(1, 2/\\(1\\+gamma\\)\\)"):
        residual_bound(3.0, 0.6, "unbiased")  # 2/(1+3) = 0.5
    with pytest.raises(CodecError, match="lr"):
        ServerErrorFeedback(lr=0)


def test_remark_3_optimal_beta_and_lemma_9_eta():
    gamma = 2.0
    assert optimal_beta(gamma, "unbiased") == pytest.approx(1 / 3)  # eq. 4.17
    assert optimal_beta(gamma, "mmse") == 1.0  # eq. 4.18
    eta_u = residual_bound(gamma, 1 / 3, "unbiased")
    eta_m = residual_bound(gamma, 1.0, "mmse")
    assert eta_u == pytest.approx(gamma * (gamma + 1))  # = 6 (docs/notes.md#weighted-ef)
    assert eta_m == pytest.approx(gamma / (math.sqrt(gamma + 1) - math.sqrt(gamma)) ** 2)
    assert eta_m == pytest.approx(19.798, abs=1e-3)
    assert eta_u < eta_m < 4 * gamma * (gamma + 1)  # Remark 4: below Karimireddy's 4 gamma (gamma + 1) = 24
    # beta* minimises (4.15): a grid over the valid range (0, min(1, 2/(1+gamma)))
    grid = [i / 1000 for i in range(1, 667)]
    best = min(grid, key=lambda b: residual_bound(gamma, b, "unbiased"))
    assert best == pytest.approx(1 / 3, abs=2e-3)
    # and beta = 1 minimises (4.16)
    assert min(grid + [1.0], key=lambda b: residual_bound(gamma, b, "mmse")) == 1.0


def _simulate(codec, memory, chains, n, steps, seed):
    """Run `chains` EF chains for `steps` rounds with g_t ~ N(0, I_n) per chain (E||g||^2 = B = n).

    Returns E||r_t||^2 / B per step (mean over chains) and the per-chain values of the last step.
    """
    r = None
    history = []
    for t in range(steps):
        g = torch.randn(chains * n, generator=torch_generator(seed, "g", t))
        z = memory.compensate(g, r)
        z_hat = codec.decode(codec.encode(z, seed=1000 * seed + t), seed=1000 * seed + t)
        r = memory.update(r, z, z_hat)
        per_chain = (r.view(chains, n) ** 2).sum(1) / n
        history.append(float(per_chain.mean()))
    return history, per_chain


def test_lemma_9_weighted_ef_residual_stays_bounded_and_classic_ef_blows_up():
    n, k, levels, chains = 64, 16, 1, 400
    codec = make_codec("qcs", dim=chains * n, block=n, k=k, levels=levels)
    gamma = codec.gamma  # 5.958 > 1
    beta = optimal_beta(gamma, "unbiased")
    eta = residual_bound(gamma, beta, "unbiased")  # gamma (gamma + 1)
    hist, last = _simulate(codec, WeightedErrorFeedback(beta=beta), chains, n, 40, seed=1)
    se = float(last.std()) / math.sqrt(chains)
    assert max(hist) < eta  # Lemma 9: E||r_t||^2 <= eta B at every t
    # Sharper check: with E[e | z] = 0 and E||e||^2 = c ||z||^2 (c = the codec's measured MSE ratio), the
    # recursion E||r'||^2 = (1-beta)^2 E||r||^2 + c (B + beta^2 E||r||^2) has the fixed point eta(c) of (4.15).
    g = torch.randn(chains * n, generator=torch_generator(2, "c"))
    e = codec.decode(codec.encode(g, seed=7), seed=7) - g
    c = float(((e.view(chains, n) ** 2).sum(1) / (g.view(chains, n) ** 2).sum(1)).mean())
    assert c < gamma
    eta_c = c / (1 - ((1 - beta) ** 2 + beta**2 * c))
    # tolerance: 5 SE of the chain mean + 10% for c's dependence on z's distribution and c's own MC error
    assert abs(hist[-1] - eta_c) < 5 * se + 0.1 * eta_c
    # classic EF (beta = 1) with unbiased QCS and gamma > 1: E||r||^2 grows like c^t (thesis text, Lemma 9)
    hist_classic, _ = _simulate(codec, ErrorFeedback(), chains, n, 12, seed=3)
    assert hist_classic[-1] > 1e4 * eta and hist_classic[-1] > 2 * hist_classic[-2]


def test_lemma_9_mmse_qcs_with_classic_ef_is_bounded():
    n, k, chains = 64, 16, 400
    codec = make_codec("qcs", dim=chains * n, block=n, k=k, levels=1, alpha="mmse")
    eta = residual_bound(codec.gamma, 1.0, "mmse")  # eq. 4.18
    hist, _ = _simulate(codec, WeightedErrorFeedback(beta=1.0), chains, n, 30, seed=4)
    assert max(hist) < eta and hist[-1] > 0.5  # bounded, and the memory is doing something


def test_server_ef_telescopes_and_checkpoints():
    d, eta, k = 50, 0.5, 5
    sef = ServerErrorFeedback(lr=eta)
    total_delta = torch.zeros(d)
    total_g = torch.zeros(d)
    for t in range(20):
        g = torch.randn(d, generator=torch_generator(5, t))
        p = sef.compensate(g)
        idx, vals = topk_sparsify(p, k)  # a biased K-sparse "recovery"
        delta = scatter_dense(idx, vals, d)
        e = sef.update(p, delta)
        assert torch.allclose(e, p - delta)
        total_delta += delta
        total_g += g
    # sum_t Delta_t = eta sum_t g_t - e_T  (docs/notes.md#tang-fiht: telescoping)
    assert torch.allclose(total_delta, eta * total_g - sef.error, atol=1e-5)
    state = sef.state_dict()
    other = ServerErrorFeedback(lr=1.0)
    other.load_state_dict(state)
    assert other.lr == eta and torch.equal(other.error, sef.error) and other.error is not sef.error
    g = torch.ones(d)
    assert torch.equal(other.compensate(g), sef.compensate(g))
    sef.reset()
    assert torch.equal(sef.compensate(g), eta * g)
    with pytest.raises(CodecError, match="state_dict"):
        other.load_state_dict({"lr": 1.0})
