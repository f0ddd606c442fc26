"""DataQ / GradCorrQ ([Hanna-DaQuSGD] Alg. 2 and 3, Theorem 1; docs/notes.md#daqusgd) and the ``dataq`` codec."""

import dataclasses
import itertools
import math

import pytest
import torch

from fl_sim.compression import CodecError, PayloadError, make_codec
from fl_sim.compression.dataq import (
    batch_bits,
    dataq_bits,
    dataq_dequantize,
    dataq_quantize,
    dataq_set_size,
    dequantize_batch,
    gradcorrq,
    gradcorrq_bound,
    gradcorrq_reconstruct,
    quantize_batch,
)
from fl_sim.rng import torch_generator


def _brute_force_s(d: int, m: int) -> int:
    """|S| by enumeration: pairs (w, v) in N^d x N^d with ||w||_1 + ||v||_1 <= (m-1)^2 (eq. 7)."""
    top = (m - 1) ** 2
    return sum(1 for c in itertools.product(range(top + 1), repeat=2 * d) if sum(c) <= top)


@pytest.mark.parametrize("d,m", [(1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (3, 2), (2, 4)])
def test_set_size_matches_brute_force(d, m):
    size = _brute_force_s(d, m)
    assert dataq_set_size(d, m) == size  # hockey-stick: C(2d + (m-1)^2, 2d)
    assert dataq_bits(d, m) == math.ceil(math.log2(size))
    if (d, m) == (2, 3):
        assert size == 70  # docs/notes.md#dataq-size


def test_bits_for_paper_sizes_and_large_arguments():
    assert dataq_bits(3072, 8) == 409  # docs/notes.md#dataq-size: exact log2|S| = 408.4 (CIFAR-10, m = 8)
    assert dataq_bits(150528, 8) == 684  # 683.2 (ImageNet)
    # the log-sum path (min(2d, (m-1)^2) > 4096) agrees with exact big-integer arithmetic
    for d, m in ((3000, 100), (2100, 70), (5000, 66)):
        n, k = 2 * d + (m - 1) ** 2, 2 * d
        assert min(k, n - k) > 4096
        assert dataq_bits(d, m) == (math.comb(n, k) - 1).bit_length()
    # Theorem 1 (ii) upper bound holds: 2 log2 m + min{2d log2(e(2d + m^2)/(2d)), m^2 log2(e(2d + m^2)/m^2)}
    for d, m in ((3072, 8), (50, 8), (10, 100)):
        bound = 2 * math.log2(m) + min(
            2 * d * math.log2(math.e * (2 * d + m * m) / (2 * d)), m * m * math.log2(math.e * (2 * d + m * m) / (m * m))
        )
        assert dataq_bits(d, m) <= math.ceil(bound)


def test_dataq_in_s_and_error_bound():
    d, m, bound = 50, 8, 1.0
    z = torch.randn(2000, d, generator=torch_generator(1, "z"))
    z = z / z.norm(dim=1, keepdim=True) * torch.rand(2000, 1, generator=torch_generator(1, "r"))
    z[0] = z[0] / z[0].norm()  # exactly on the sphere ||Z|| = B
    z[1] = 0.0
    z[2] = 0.0
    z[2, 7] = -1.0  # single coordinate at -B
    a, b = dataq_quantize(z, m, bound)
    assert a.min() >= 0 and b.min() >= 0 and ((a > 0) & (b > 0)).sum() == 0
    assert int((a + b).sum(1).max()) <= (m - 1) ** 2  # Theorem 1 (i)
    zq = dataq_dequantize(a, b, m, bound)
    err = (z - zq).abs().max()
    assert err <= bound / (m - 1) + 1e-6  # Theorem 1 (iii): 0.142857
    assert float(err) > 0.9 * bound / (m - 1)  # the bound is nearly attained (notes: max 0.142857)
    assert (zq[1] == 0).all() and zq[2, 7] == -1.0
    assert (zq.norm(dim=1) <= (1 + math.sqrt(d) / (m - 1)) * bound + 1e-5).all()


def test_dataq_rejects_out_of_bound_and_bad_args():
    with pytest.raises(CodecError, match=r"\|\|Z\|\|_2 = 2 > B = 1"):
        dataq_quantize(torch.tensor([[2.0, 0.0]]), 8, 1.0)
    with pytest.raises(CodecError, match="m"):
        dataq_quantize(torch.zeros(2, 3), 1, 1.0)
    with pytest.raises(CodecError, match="B must be"):
        dataq_quantize(torch.zeros(2, 3), 4, 0.0)
    with pytest.raises(CodecError, match="NaN"):
        dataq_quantize(torch.tensor([math.nan]), 4, 1.0)


def test_gradcorrq_unbiased_one_bit():
    h, d, m, bound, c_z, trials = 20, 5, 10, 1.0, 1.0, 200_000
    lim = gradcorrq_bound(m, bound, c_z, d)  # eq. 8: C_z B sqrt(d)/(m-1)
    delta = (torch.rand(h, generator=torch_generator(2, "delta")) * 2 - 1) * lim
    i_star, bit = gradcorrq(delta.expand(trials, h), m, bound, c_z, d, generator=torch_generator(2, "gc"))
    assert set(bit.unique().tolist()) <= {0, 1} and i_star.shape == (trials,)
    est = gradcorrq_reconstruct(i_star, bit, h, m, bound, c_z, d)
    assert ((est != 0).sum(1) == 1).all()
    amp = h * lim  # eq. 10 magnitude; per coordinate Var <= amp^2 / h, SE = amp / sqrt(h trials)
    assert (est.mean(0) - delta).abs().max() < 5 * amp / math.sqrt(h * trials)


def test_quantize_batch_per_feature():
    z = torch.randn(16, 40, generator=torch_generator(3, "z")) * 3
    for bits in (2, 3, 8):
        levels, scale = quantize_batch(z, bits)
        steps = 2 ** (bits - 1) - 1
        assert levels.dtype == torch.int16 and levels.abs().max() <= steps
        assert float(scale) == float(z.abs().max())  # max_i ||Z_i||_inf, one float32
        zq = dequantize_batch(levels, scale, bits)
        assert (z - zq).abs().max() <= float(scale) / steps * (1 + 1e-6)
        assert batch_bits(16, 40, bits) == 32 + 16 * 40 * bits
    zero_levels, zero_scale = quantize_batch(torch.zeros(4, 3), 3)
    assert float(zero_scale) == 0 and (dequantize_batch(zero_levels, zero_scale, 3) == 0).all()
    empty_levels, empty_scale = quantize_batch(torch.zeros(0, 3), 3)
    assert empty_levels.shape == (0, 3) and batch_bits(0, 3, 3) == 0
    with pytest.raises(CodecError, match="1 bit leaves only the zero level"):
        quantize_batch(z, 1)
    with pytest.raises(CodecError, match="levels outside"):
        dequantize_batch(torch.tensor([[4]]), 1.0, 3)


@pytest.mark.parametrize("mode", ["exact", "per_feature"])
@pytest.mark.parametrize("bound", [None, 3.0])
def test_dataq_codec_modes(mode, bound):
    n, d, m = 12, 10, 6
    z = torch.randn(n, d, generator=torch_generator(4, "z"))
    if bound is not None:
        z = z / z.norm(dim=1, keepdim=True) * bound * 0.99
    codec = make_codec("dataq", dim=n * d, levels=m, bound=bound, mode=mode, features=d)
    p = codec.encode(z.reshape(-1), seed=0)
    per_sample = dataq_bits(d, m) if mode == "exact" else d * math.ceil(math.log2(2 * m - 1))
    header = 0 if bound is not None else (32 * n if mode == "exact" else 32)
    assert p.bits == header + n * per_sample
    zq = codec.decode(p, seed=0).view(n, d)
    if mode == "exact":
        scale = torch.full((n, 1), bound) if bound is not None else z.norm(dim=1, keepdim=True)
        assert int((p.tensors["a"].long() + p.tensors["b"].long()).sum(1).max()) <= (m - 1) ** 2
    else:
        scale = torch.full((n, 1), bound if bound is not None else float(z.abs().max()))
    assert ((z - zq).abs() <= scale / (m - 1) * (1 + 1e-5)).all()


def test_dataq_codec_errors():
    codec = make_codec("dataq", dim=20, levels=4, bound=1.0, mode="exact", features=10)
    with pytest.raises(CodecError, match="exceeds bound"):
        codec.encode(torch.ones(20), seed=0)
    with pytest.raises(CodecError, match="divisor"):
        make_codec("dataq", dim=20, features=3)
    with pytest.raises(CodecError, match="mode"):
        make_codec("dataq", dim=20, mode="fast")
    p = codec.encode(torch.full((20,), 0.3), seed=0)
    a = p.tensors["a"].clone()
    a[0] = 3  # ||a||_1 = 30 > (m-1)^2 = 9: not an element of S
    with pytest.raises(PayloadError, match="not in S"):
        codec.decode(dataclasses.replace(p, tensors={**p.tensors, "a": a}), seed=0)


# ------------------------------------------------------------------------------------------------ check_values
def _tampered(payload, **tensors):
    from fl_sim.compression import Payload

    return Payload(payload.codec, payload.dim, {**payload.tensors, **tensors}, payload.bits, payload.meta)


@pytest.mark.parametrize("mode", ["exact", "per_feature"])
def test_dataq_check_values_rejects_impossible_payloads(mode):
    from fl_sim.compression import PayloadError, make_codec

    codec = make_codec("dataq", dim=40, levels=4, mode=mode, features=10)  # 4 samples of 10 features, scale sent
    z = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    good = codec.encode(z.reshape(-1), seed=0)
    codec.check_values(good)  # a real payload passes
    a, b = good.tensors["a"].clone(), good.tensors["b"].clone()
    too_big = a.clone()
    too_big[0, 0] = 4  # level m = 4 on [0, m-1 = 3]
    both = a.clone()
    j = int(torch.nonzero(b[0])[0])
    both[0, j] = 1  # a and b both > 0 at one feature
    bad = [dict(a=too_big), dict(a=both), dict(scale=-good.tensors["scale"].abs() - 1),
           dict(scale=torch.full_like(good.tensors["scale"], float("nan"))),
           dict(a=a[:, :5].contiguous()), dict(scale=torch.zeros_like(good.tensors["scale"]))]
    if mode == "exact":  # a sample outside S: ||a||_1 + ||b||_1 > (m-1)^2 = 9
        out_of_s = torch.zeros_like(a)
        out_of_s[0, :] = 1
        bad.append(dict(a=out_of_s, b=torch.zeros_like(b)))
    for change in bad:
        with pytest.raises(PayloadError):
            codec.check_values(_tampered(good, **change))
        with pytest.raises(PayloadError):
            codec.decode(_tampered(good, **change), seed=0)
