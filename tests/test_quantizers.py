"""Quantizer kernels: dithered ([Abdi-thesis] eqs. 4.4-4.7; the 1-bit erratum of docs/notes.md#qcs-1bit-erratum),
QSGD, TernGrad, sign, top-k.

Statistical tests: fixed seeds, T independent trials batched as rows; tolerances are 5 standard errors
of the Monte-Carlo mean (two-sided normal tail 5.7e-7 per check), derived in each test.
"""

import math

import pytest
import torch

from fl_sim.compression.base import CodecError
from fl_sim.compression.quantizers import (
    check_levels,
    dithered_bits,
    dithered_dequantize,
    dithered_quantize,
    level_bits,
    qsgd_bits,
    qsgd_dequantize,
    qsgd_quantize,
    qsgd_variance_bound,
    randk_indices,
    scaled_sign,
    scaled_sign_decode,
    terngrad_dequantize,
    terngrad_quantize,
    topk_bits,
    topk_sparsify,
    uniform_dither,
)
from fl_sim.rng import torch_generator

T = 20_000  # Monte-Carlo trials


def _dithered_trials(v: torch.Tensor, levels: float, seed: str):
    """T dithered quantizations of the same v (rows), with v_hat and rho = ||v||_inf / Q."""
    vs = v.expand(T, -1).contiguous()
    u = uniform_dither(vs.shape, generator=torch_generator(0, seed))
    q, s = dithered_quantize(vs, levels, u)
    return q, u, dithered_dequantize(q, s, levels, u), float(s[0]) / levels


def test_dithered_error_is_uniform_and_unbiased():
    v = torch.randn(64, generator=torch_generator(1, "v"))
    q, _, v_hat, rho = _dithered_trials(v, 2, "dither")
    assert q.abs().max() <= 2 and q.dtype == torch.int8
    e = (v_hat - v) / rho  # eq. 4.7 / Thm 18: e ~ U(-1/2, 1/2) independent of v
    assert e.abs().max() <= 0.5 + 1e-5
    # mean: Var = 1/12 per entry; per coordinate SE = sqrt(1/(12 T)) = 0.00204, 5 SE = 0.0102
    assert e.mean(0).abs().max() < 5 * math.sqrt(1 / (12 * T))
    # variance 1/12: Var(e^2) = 1/80 - 1/144 = 1/180; over N = 64 T entries SE = sqrt(1/(180 N))
    n = e.numel()
    assert abs(float((e**2).mean()) - 1 / 12) < 5 * math.sqrt(1 / (180 * n))
    # uniform: 10 equal bins, each count ~ Binomial(N, 1/10): SE = sqrt(N 0.09)
    counts = torch.histc(e, bins=10, min=-0.5, max=0.5)
    assert (counts - n / 10).abs().max() < 5 * math.sqrt(n * 0.09)


def test_one_bit_erratum_fixed_form_unbiased_printed_form_biased_by_two():
    v = torch.randn(32, generator=torch_generator(2, "v"))
    q, u, v_hat, rho = _dithered_trials(v, 0.5, "dither1")
    assert set(q.unique().tolist()) <= {-1, 1}
    assert rho == pytest.approx(2 * float(v.abs().max()), rel=1e-6)  # eq. 4.5: rho = 2 ||v||_inf
    # fixed v_hat = rho (q/2 - u): error rho U(-1/2,1/2), SE per coordinate rho sqrt(1/(12 T))
    se = rho * math.sqrt(1 / (12 * T))
    assert (v_hat.mean(0) - v).abs().max() < 5 * se
    # printed v_hat = rho (q - u): E = 2 v (docs/notes.md#qcs-1bit-erratum). Var <= rho^2 (1 + 1/12) per entry.
    printed = rho * (q.to(torch.float32) - u)
    se_p = rho * math.sqrt((1 + 1 / 12) / T)
    assert (printed.mean(0) - 2 * v).abs().max() < 5 * se_p
    assert (printed.mean(0) - v).abs().max() > 10 * se_p  # biased: the printed form is wrong


def test_dithered_degenerate_inputs_never_nan():
    u = uniform_dither((4, 8), generator=torch_generator(3, "u"))
    v = torch.zeros(4, 8)
    v[1, 3] = 5.0  # single nonzero
    v[2] = 1e-42  # subnormal
    v[3] = torch.linspace(-1e38, 1e38, 8)  # near float32 overflow (rho = 2e38 in the 1-bit case)
    for levels in (0.5, 1, 3):
        q, s = dithered_quantize(v, levels, u)
        v_hat = dithered_dequantize(q, s, levels, u)
        assert torch.isfinite(v_hat).all()
        assert (v_hat[0] == 0).all() and s[0] == 0  # zero in, zero out
        rho = s / levels
        bound = rho * 0.5  # |e| <= rho/2: subtractive dither, step 1 (1-bit: grid {-1/2, 1/2}, no overload)
        err = (v_hat.double() - v.double()).abs().amax(1)
        assert (err[:3] <= bound[:3] * (1 + 1e-5) + 1e-45).all()
        assert float(err[3] / bound[3]) <= 1 + 1e-5


def test_level_bits_and_levels_validation():
    assert [level_bits(q) for q in (0.5, 1, 2, 3, 4, 7, 8)] == [1, 2, 3, 3, 4, 4, 5]
    assert dithered_bits(3, 10, 2) == 3 * (32 + 30)
    for bad in (0, -1, 1.5, True, "2", 2**21):
        with pytest.raises(CodecError, match="levels"):
            check_levels(bad, "t")


def test_qsgd_unbiased_and_variance_matches_exact_value_and_bound():
    d, s = 64, 2
    x = torch.randn(d, generator=torch_generator(4, "x"))
    norm, q = qsgd_quantize(x.expand(T, -1).contiguous(), s, generator=torch_generator(4, "qsgd"))
    x_hat = qsgd_dequantize(norm, q, s)
    assert q.abs().max() <= s
    # per coordinate: x_hat_i = (||x||/s) sign l_i, l_i = floor(r) + Bernoulli(f), r = s|x_i|/||x||:
    # Var = (||x||/s)^2 f (1 - f) <= (||x||/s)^2 / 4  ->  SE <= (||x||/s) / (2 sqrt(T))
    nx = float(x.norm())
    assert (x_hat.mean(0) - x).abs().max() < 5 * nx / s / (2 * math.sqrt(T))
    r = s * x.abs() / nx
    f = r - r.floor()
    exact = float(((nx / s) ** 2 * f * (1 - f)).sum())
    mse = ((x_hat - x) ** 2).sum(1)
    se = float(mse.std()) / math.sqrt(T)
    assert abs(float(mse.mean()) - exact) < 5 * se
    assert exact <= qsgd_variance_bound(d, s) * nx**2  # Lemma 3.1
    assert qsgd_bits(d, s) == 32 + d * (1 + 2)


def test_terngrad_unbiased_with_exact_variance():
    x = torch.randn(48, generator=torch_generator(5, "x"))
    s, q = terngrad_quantize(x.expand(T, -1).contiguous(), generator=torch_generator(5, "tern"))
    x_hat = terngrad_dequantize(s, q)
    assert set(q.unique().tolist()) <= {-1, 0, 1}
    m = float(x.abs().max())
    var_i = m * x.abs() - x**2  # Var of s sign b, b ~ Bernoulli(|x_i|/s)
    assert ((x_hat.mean(0) - x).abs() <= 5 * (var_i / T).sqrt() + 1e-6).all()
    mse = ((x_hat - x) ** 2).sum(1)
    assert abs(float(mse.mean()) - float(var_i.sum())) < 5 * float(mse.std()) / math.sqrt(T)


def test_scaled_sign_hand_example():
    x = torch.tensor([[3.0, -1.0, 0.0, -4.0]])
    scale, signs = scaled_sign(x)
    assert signs.tolist() == [[1, -1, 1, -1]]  # sign(0) = +1
    assert float(scale[0]) == pytest.approx(8.0 / 4)  # ||x||_1 / d
    assert scaled_sign_decode(scale, signs).tolist() == [[2.0, -2.0, 2.0, -2.0]]


def test_topk_exact_and_randk_seeded():
    x = torch.tensor([0.1, -5.0, 2.0, 0.0, 3.0, -0.2])
    idx, vals = topk_sparsify(x, 3)
    assert idx.tolist() == [1, 2, 4] and vals.tolist() == [-5.0, 2.0, 3.0]
    assert topk_bits(6, 3) == 3 * (32 + 3)
    a = randk_indices(100, 10, generator=torch_generator(7, "r"))
    b = randk_indices(100, 10, generator=torch_generator(7, "r"))
    c = randk_indices(100, 10, generator=torch_generator(8, "r"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 10 and torch.equal(a, a.sort().values) and 0 <= a.min() and a.max() < 100


def test_randk_subsets_are_uniform():
    # sparse path (4k <= d): every index included with probability k/d; per index the frequency over
    # T draws has SE sqrt(p (1 - p) / T) = 0.006 for p = 1/8, T = 3000; 5 SE = 0.03
    d, k, trials = 40, 5, 3000
    g = torch_generator(9, "uniform")
    counts = torch.zeros(d)
    for _ in range(trials):
        idx = randk_indices(d, k, generator=g)
        assert idx.unique().numel() == k
        counts[idx] += 1
    p = k / d
    assert (counts / trials - p).abs().max() < 5 * math.sqrt(p * (1 - p) / trials)
