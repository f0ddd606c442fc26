"""QCS ([Abdi-thesis] Ch. 4: Theorem 7, Lemma 8, eq. 4.11, 1-bit erratum) and RLC (Ch. 5: Lemma 13).

Monte-Carlo trick: QCS is blockwise and every block draws its own signs, rows and dither, so a vector
of B blocks is B independent trials in one encode/decode. Tolerances: 5 standard errors of the MC mean
(sample std / sqrt(trials)); the reference values of docs/notes.md#qcs-numbers get 5 SE of ours plus 1.5%
for their own MC noise and test-vector choice (the notes state neither).
"""

import math

import pytest
import torch

from fl_sim.compression import make_codec
from fl_sim.compression.codecs.qcs import qcs_gamma
from fl_sim.rng import torch_generator


def _blocks_trial(n, k, levels, g_blocks, *, alpha="unbiased", seed=1):
    """Encode/decode B blocks at once; returns (g_hat (B, n), per-block ||e||^2/||g||^2, codec)."""
    b = g_blocks.shape[0]
    codec = make_codec("qcs", dim=b * n, block=n, k=k, levels=levels, alpha=alpha)
    g_hat = codec.decode(codec.encode(g_blocks.reshape(-1), seed=seed), seed=seed).view(b, n)
    ratio = ((g_hat - g_blocks) ** 2).sum(1) / (g_blocks**2).sum(1)
    return g_hat, ratio, codec


def _gauss(b, n, seed):
    return torch.randn(b, n, generator=torch_generator(seed, "g"))


def _mean_se(t):
    return float(t.mean()), float(t.std()) / math.sqrt(t.numel())


def test_gamma_and_gain_match_the_notes_table():
    assert qcs_gamma(256, 32, 1) == pytest.approx(14.155, abs=1e-3)
    assert qcs_gamma(256, 32, 2) == pytest.approx(8.789, abs=1e-3)
    assert qcs_gamma(256, 32, 4) == pytest.approx(7.447, abs=1e-3)
    assert qcs_gamma(256, 32, 0.5) == pytest.approx(35.62, abs=1e-2)  # 1-bit: Q = 1/2 in eq. 4.10
    assert qcs_gamma(256, 110, 2) == pytest.approx(2.017, abs=1e-3)
    assert qcs_gamma(64, 1, 3) == 63.0
    c = make_codec("qcs", dim=256, block=256, k=32, levels=1)
    assert c.compression_gain == pytest.approx(161.5, abs=0.05)  # eq. 4.11
    assert c.gamma == qcs_gamma(256, 32, 1)
    assert make_codec("qcs", dim=256, block=256, k=32, levels=1, alpha="mmse").alpha_value == pytest.approx(1 / 15.155067, rel=1e-6)
    d = make_codec("qcs", dim=5000)  # defaults: n = 256, k = 110, Q = 2
    assert (d.block, d.k, d.levels) == (256, 110, 2.0)


def test_unbiased_qcs_is_unbiased():
    n, b = 64, 4000
    g = _gauss(1, n, 3).expand(b, n).contiguous()  # the same g in every block
    g_hat, _, _ = _blocks_trial(n, 8, 2, g)
    se = g_hat.std(0) / math.sqrt(b)
    assert ((g_hat.mean(0) - g[0]).abs() <= 5 * se).all()


@pytest.mark.parametrize("levels,notes_emp", [(1, 10.81), (2, 7.95), (4, 7.23), (0.5, 22.25)])
def test_mse_below_gamma_and_close_to_notes_monte_carlo(levels, notes_emp):
    n, k, b = 256, 32, 2000
    _, ratio, codec = _blocks_trial(n, k, levels, _gauss(b, n, 4))
    mean, se = _mean_se(ratio)
    assert mean + 5 * se < codec.gamma  # Theorem 7 (eq. 4.10), strictly below the bound
    assert abs(mean - notes_emp) < 5 * se + 0.015 * notes_emp
    assert mean > n / k - 1 - 5 * se  # the exact projection part (n/k - 1) is a floor


@pytest.mark.parametrize("n", [64, 256])
def test_mse_below_gamma_over_a_range_of_n_k_q(n):
    b = 600 if n == 64 else 300
    g = _gauss(b, n, 5)
    for k in (2, 8, n // 2, n):
        for levels in (0.5, 1, 3):
            _, ratio, codec = _blocks_trial(n, k, levels, g, seed=k)
            mean, se = _mean_se(ratio)
            assert mean <= codec.gamma + 5 * se, (n, k, levels, mean, codec.gamma)


def test_k_equal_one_is_exact_scalar_and_mse_is_n_minus_one():
    # k = 1: |v| and its sign are sent (proof of Thm 7): E||e||^2 = (n/k - 1)||g||^2 = (n - 1)||g||^2 exactly
    n, b = 32, 4000
    _, ratio, codec = _blocks_trial(n, 1, 2, _gauss(b, n, 6))
    mean, se = _mean_se(ratio)
    assert codec.gamma == n - 1
    assert abs(mean - (n - 1)) < 5 * se


def test_one_bit_variant_unbiased_and_printed_formula_biased_by_two():
    n, k, b = 64, 16, 4000
    g = _gauss(1, n, 7).expand(b, n).contiguous()
    g_hat, _, codec = _blocks_trial(n, k, 0.5, g, seed=9)
    se = g_hat.std(0) / math.sqrt(b)
    assert ((g_hat.mean(0) - g[0]).abs() <= 5 * se).all()
    # printed eq. 4.6 with rho = 2||v||_inf: v_hat = rho (q - u) (docs/notes.md#qcs-1bit-erratum),
    # rebuilt from the payload
    p = codec.encode(g.reshape(-1), seed=9)
    rho = p.tensors["scale"].double() / 0.5
    v_printed = (p.tensors["q"].double() - codec._dither(9).double()) * rho.unsqueeze(1)
    g_printed = codec._ops(9).adjoint(v_printed.reshape(-1)).view(b, n)
    slope = float((g_printed.mean(0) * g[0]).sum() / (g[0] ** 2).sum())
    assert slope == pytest.approx(2.0, abs=0.1)  # E[g_hat] = 2 g as printed; MC slope SE ~ 0.02


def test_mmse_scaling_lowers_the_error_below_lemma_8():
    n, k, b = 256, 32, 2000
    g = _gauss(b, n, 8)
    _, r_unb, cu = _blocks_trial(n, k, 1, g)
    _, r_mmse, cm = _blocks_trial(n, k, 1, g, alpha="mmse")
    mean, se = _mean_se(r_mmse)
    bound = cu.gamma / (cu.gamma + 1)  # Lemma 8: (1 - alpha) = gamma/(gamma+1) = 0.9340 (notes' Monte-Carlo: 0.9195)
    assert cm.mse_bound == pytest.approx(bound)
    assert mean + 5 * se < bound
    assert abs(mean - 0.9195) < 5 * se + 0.015
    assert mean < float(r_unb.mean())


def test_padding_of_a_partial_last_block():
    d = 1000  # 3 full blocks of 256 and one of 232 (zero-padded)
    codec = make_codec("qcs", dim=d, block=256, k=64, levels=2)
    x = torch.randn(d, generator=torch_generator(10, "x"))
    p = codec.encode(x, seed=3)
    assert p.tensors["q"].shape == (4, 64) and p.bits == 4 * 32 + 4 * 64 * 3
    y = codec.decode(p, seed=3)
    assert y.shape == (d,) and float(((y - x) ** 2).sum() / (x**2).sum()) < 3 * codec.gamma


# -- RLC (Ch. 5) ----------------------------------------------------------------------------------------
def test_rlc_unbiased_and_lemma_13_mse():
    d, m, trials = 64, 16, 2000
    g = torch.randn(d, generator=torch_generator(11, "g"))
    c = make_codec("rlc", dim=d, m=m)
    g_hat = torch.stack([c.decode(c.encode(g, seed=s), seed=s) for s in range(trials)])
    se = g_hat.std(0) / math.sqrt(trials)
    assert ((g_hat.mean(0) - g).abs() <= 5 * se).all()
    err = ((g_hat - g) ** 2).sum(1) / (g**2).sum()
    mean, se_m = _mean_se(err)
    assert c.mse_factor == d / m - 1 == 3.0
    assert abs(mean - c.mse_factor) < 5 * se_m  # Lemma 13 (noise-free): (d/m - 1) ||g||^2


def test_rlc_is_linear_and_aggregate_does_not_alias_inputs():
    d, m = 300, 40
    c = make_codec("rlc", dim=d, m=m)
    assert c.linear and c.n == 512 and c.mse_factor == 512 / 40 - 1
    xs = [torch.randn(d, generator=torch_generator(12, i)) for i in range(3)]
    w = [0.5, 0.3, 0.2]
    ps = [c.encode(x, seed=4) for x in xs]
    before = [p.tensors["y"].clone() for p in ps]
    agg = c.aggregate(ps, w)
    assert agg.bits == 32 * m and agg.tensors["y"] is not ps[0].tensors["y"]
    agg.tensors["y"].zero_()
    assert all(torch.equal(p.tensors["y"], b) for p, b in zip(ps, before))
    agg = c.aggregate(ps, w)
    together = c.decode(agg, seed=4)
    separate = sum(wi * c.decode(p, seed=4) for wi, p in zip(w, ps))
    assert torch.allclose(together, separate, atol=1e-5)
    assert torch.allclose(agg.tensors["y"], c.operator(4).forward(sum(wi * x for wi, x in zip(w, xs))), atol=1e-5)
    with pytest.raises(Exception, match="one weight per payload"):
        c.aggregate(ps, w[:2])


def test_qcs_is_not_linear():
    c = make_codec("qcs", dim=64, block=64, k=8)
    with pytest.raises(Exception, match="not linear"):
        c.aggregate([c.encode(torch.ones(64), seed=0)], [1.0])
