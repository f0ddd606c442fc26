"""Codecs count_sketch, cs_fiht and onebit_cs: round trips, bits, seeds, aggregation, errors, statistics."""

import math

import pytest
import torch

from fl_sim.compression import make_codec
from fl_sim.compression.base import CodecError, Payload, PayloadError

D = 1000  # not a power of 2

CODECS = {
    "count_sketch": dict(rows=5, cols=200, k=5),
    "cs_fiht": dict(measurements=200, sparsity=5),
    "cs_fiht_wht": dict(measurements=200, sparsity=5, transform="wht"),
    "onebit_none": dict(measurements=512),
    "onebit_lp": dict(measurements=256, recovery="lp", block=128),
    "onebit_biht": dict(measurements=512, recovery="biht", sparsity=5),
    "onebit_common": dict(measurements=512, phi="common", recovery="biht", sparsity=5),
}


def _make(key, dim=D):
    name = "cs_fiht" if key.startswith("cs_fiht") else "onebit_cs" if key.startswith("onebit") else key
    return make_codec(name, dim=dim, **CODECS[key])


def _sparse(d=D, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(d)
    x[torch.randperm(d, generator=g)[:k]] = torch.randn(k, generator=g) + 2.0 * torch.sign(torch.randn(k, generator=g))
    return x


def _cos(a, b):
    return float(a @ b) / float(a.norm() * b.norm())


def _expected_bits(codec):
    if codec.name == "count_sketch":
        return 32 * codec.rows * codec.cols
    if codec.name == "cs_fiht":
        return 32 * codec.measurements
    return codec.m + 32 * codec.blocks  # one float32 rho_b per block


# ------------------------------------------------------------------------------------------------ common
@pytest.mark.parametrize("key", list(CODECS))
def test_round_trip_bits_and_determinism(key):
    codec = _make(key)
    x = _sparse()
    p = codec.encode(x, seed=5)
    assert p.codec == codec.name and p.dim == D
    assert p.bits == _expected_bits(codec) == codec.nominal_bits()
    out = codec.decode(p, seed=5)
    assert out.shape == (D,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    again = codec.encode(x, seed=5)
    assert all(torch.equal(p.tensors[k], again.tensors[k]) for k in p.tensors)
    assert torch.equal(codec.decode(again, seed=5), out)
    other = codec.encode(x, seed=6)
    assert any(not torch.equal(p.tensors[k], other.tensors[k]) for k in p.tensors)


@pytest.mark.parametrize("key", list(CODECS))
def test_degenerate_inputs(key):
    codec = _make(key)
    # all-zero in, zero out
    assert torch.equal(codec.decode(codec.encode(torch.zeros(D), seed=1), seed=1), torch.zeros(D))
    # float16 and float64 inputs are accepted, output is float32
    x = _sparse(seed=2)
    for dtype in (torch.float16, torch.float64):
        out = codec.decode(codec.encode(x.to(dtype), seed=1), seed=1)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # tiny and huge magnitudes: finite and equivariant (every codec here is homogeneous in x)
    ref = codec.decode(codec.encode(x, seed=1), seed=1)
    for c in (1e-30, 1e30):
        out = codec.decode(codec.encode(x * c, seed=1), seed=1)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double() / c, ref.double(), rtol=1e-3, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("key", list(CODECS))
def test_bad_inputs_raise_codec_error(key):
    codec = _make(key)
    with pytest.raises(CodecError, match="length"):
        codec.encode(torch.zeros(D + 1), seed=0)
    with pytest.raises(CodecError, match="floating"):
        codec.encode(torch.zeros(D, dtype=torch.int32), seed=0)
    bad = torch.zeros(D)
    bad[3] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        codec.encode(bad, seed=0)
    with pytest.raises(CodecError, match="seed"):
        codec.encode(torch.zeros(D), seed="x")


@pytest.mark.parametrize("key", list(CODECS))
def test_malformed_payloads_raise_payload_error(key):
    codec = _make(key)
    p = codec.encode(_sparse(), seed=0)
    name, t = next(iter(p.tensors.items()))
    with pytest.raises(PayloadError, match="made by codec"):
        codec.decode(Payload("topk", D, p.tensors, p.bits), seed=0)
    with pytest.raises(PayloadError, match="shape"):
        codec.decode(Payload(p.codec, D, {**p.tensors, name: t.flatten()[:-1]}, p.bits), seed=0)
    with pytest.raises(PayloadError, match="lacks"):
        codec.decode(Payload(p.codec, D, {}, p.bits), seed=0)
    with pytest.raises(PayloadError, match="dim"):
        codec.decode(Payload(p.codec, D + 1, p.tensors, p.bits), seed=0)
    floats = [k for k, v in p.tensors.items() if torch.is_floating_point(v)]
    nan = p.tensors[floats[0]].clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(PayloadError, match="NaN"):
        codec.decode(Payload(p.codec, D, {**p.tensors, floats[0]: nan}, p.bits), seed=0)
    with pytest.raises(PayloadError, match="dtype"):
        codec.decode(Payload(p.codec, D, {**p.tensors, floats[0]: p.tensors[floats[0]].double()}, p.bits), seed=0)


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("count_sketch", dict(rows=0), "rows"),
        ("count_sketch", dict(cols=2.5), "cols"),
        ("count_sketch", dict(k=-1), "k must"),
        ("count_sketch", dict(depth=3), "allowed parameters"),
        ("cs_fiht", dict(measurements=D + 1), "exceeds"),
        ("cs_fiht", dict(measurements=10, transform="fft"), "transform"),
        ("cs_fiht", dict(measurements=10, sparsity=0), "sparsity"),
        ("cs_fiht", dict(measurements=10, tol=-1.0), "tol"),
        ("onebit_cs", dict(measurements=10, phi="each"), "phi"),
        ("onebit_cs", dict(measurements=10, recovery="omp"), "recovery"),
        ("onebit_cs", dict(measurements=10, block=100), "power of 2"),
        ("onebit_cs", dict(measurements=4096), "M <="),
        ("onebit_cs", dict(measurements=2048, recovery="lp", block=4096), "block"),
    ],
)
def test_bad_parameters(name, params, match):
    with pytest.raises(CodecError, match=match):
        make_codec(name, dim=D, **params)


# ------------------------------------------------------------------------------------------------ count_sketch
def test_count_sketch_linear_aggregation_and_heavy_hitters():
    codec = make_codec("count_sketch", dim=D, rows=5, cols=400, k=5)
    a, b = _sparse(seed=1), _sparse(seed=2)
    pa, pb = codec.encode(a, seed=3), codec.encode(b, seed=3)
    agg = codec.aggregate([pa, pb], [0.25, 0.75])
    assert agg.bits == 32 * 5 * 400
    direct = codec.encode(0.25 * a + 0.75 * b, seed=3)
    torch.testing.assert_close(agg.tensors["table"], direct.tensors["table"], rtol=0, atol=1e-5)
    # a 5-sparse vector, 400 buckets per row: decode returns it exactly unless two of its coordinates
    # collide in 3 or more of 5 rows (probability ~ 10 * C(5,3) / 400^3 ~ 1.6e-6)
    torch.testing.assert_close(codec.decode(pa, seed=3), a, rtol=0, atol=1e-6)
    with pytest.raises(CodecError, match="one weight per payload"):
        codec.aggregate([pa], [0.5, 0.5])


def test_count_sketch_k_larger_than_d_and_single_nonzero():
    codec = make_codec("count_sketch", dim=7, rows=3, cols=50, k=100)
    x = torch.zeros(7)
    x[6] = -2.5
    torch.testing.assert_close(codec.decode(codec.encode(x, seed=0), seed=0), x, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ cs_fiht
def test_cs_fiht_linear_measure_recover():
    codec = make_codec("cs_fiht", dim=D, measurements=200, sparsity=5)
    a, b = _sparse(seed=1), _sparse(seed=2)
    pa, pb = codec.encode(a, seed=9), codec.encode(b, seed=9)
    agg = codec.aggregate([pa, pb], [0.5, 2.0])
    assert agg.bits == 32 * 200 and agg.tensors["y"].dtype == torch.float32
    torch.testing.assert_close(agg.tensors["y"], codec.measure(0.5 * a + 2.0 * b, seed=9), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.measure(a, seed=9), pa.tensors["y"])
    assert torch.equal(codec.recover(pa.tensors["y"], seed=9), codec.decode(pa, seed=9))
    # Q = 200 = 40 K measurements of a 5-sparse vector: exact recovery (FIHT tol 1e-4 relative)
    assert float((codec.decode(pa, seed=9) - a).norm() / a.norm()) < 1e-3
    # batched measurement of C clients
    assert torch.allclose(codec.measure(torch.stack([a, b]), seed=9)[1], pb.tensors["y"], atol=1e-5)
    # Phi Phi^T = (d/Q) I: measurement-space error feedback r = Phi p - Phi Delta is exact
    phi = codec.operator(9)
    assert phi.m == 200 and phi.d == D


def test_cs_fiht_sparsity_larger_than_d():
    codec = make_codec("cs_fiht", dim=16, measurements=16, sparsity=100)
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(codec.decode(codec.encode(x, seed=1), seed=1), x, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ onebit_cs
def test_onebit_dequantization_is_unbiased_with_variance_rho2_over_12():
    # e = v_hat - v, normalized by rho, is U(-1/2, 1/2) for every entry (subtractive dither, no overload):
    # mean over N trials ~ N(0, 1/(12 N)); with N = 1500, sd = 0.00745 and the bound 5 sd = 0.037
    # for each of m = 64 entries (P(any of 64 beyond 5 sd) ~ 4e-5). Second moment: Var(U^2) =
    # 1/80 - 1/144 = 0.00556 over N m = 96,000 samples -> sd 2.4e-4, bound 5 sd = 1.2e-3 around 1/12.
    d, m, n_trials = 64, 64, 1500
    codec = make_codec("onebit_cs", dim=d, measurements=m)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    errs = torch.empty(n_trials, m)
    for t in range(n_trials):  # each seed draws a new Phi and a new dither u
        p = codec.encode(x, seed=t)
        v = codec.operator(t).forward(x)
        rho = float(p.tensors["rho"][0])
        assert rho == pytest.approx(2 * float(v.abs().max()), rel=1e-6)
        errs[t] = (codec.dequantize(p, seed=t) - v) / rho
    assert float(errs.abs().max()) <= 0.5 + 1e-5  # |v_hat - v| <= rho / 2: the LP box is exact
    assert float(errs.mean(0).abs().max()) < 5 * math.sqrt(1 / (12 * n_trials))
    assert abs(float(errs.pow(2).mean()) - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / (n_trials * m))


def test_onebit_adjoint_decode_is_unbiased():
    # recovery="none": E[Phi^T v_hat] = E[Phi^T Phi] x = x ([Abdi-thesis] Lemma 6). Tolerance: 5 standard errors
    # of each coordinate's Monte-Carlo mean, estimated from the same N = 800 samples. The expectation is
    # over Phi too, so Phi is redrawn with each seed (phi_schedule="round"; the default fixes it a priori).
    d, n_trials = 32, 800
    codec = make_codec("onebit_cs", dim=d, measurements=16, phi_schedule="round")
    x = torch.randn(d, generator=torch.Generator().manual_seed(1))
    outs = torch.stack([codec.decode(codec.encode(x, seed=t), seed=t) for t in range(n_trials)])
    se = outs.std(0) / math.sqrt(n_trials)
    assert ((outs.mean(0) - x).abs() < 5 * se).all()


def test_onebit_common_aggregate_equals_weighted_dequantized_sum():
    codec = make_codec("onebit_cs", dim=D, measurements=512, phi="common")
    assert codec.linear
    xs = [_sparse(seed=s) for s in range(3)]
    ps = [codec.encode(x, seed=4) for x in xs]
    w = [0.2, 0.3, 0.5]
    agg = codec.aggregate(ps, w)
    assert agg.bits == 32 * (codec.m + 2 * codec.blocks)
    expected = sum(wi * codec.dequantize(p, seed=4) for wi, p in zip(w, ps))
    torch.testing.assert_close(codec.dequantize(agg, seed=4), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(agg, seed=4), codec.operator(4).adjoint(expected), rtol=1e-4, atol=1e-4)
    per_worker = make_codec("onebit_cs", dim=D, measurements=512)
    assert not per_worker.linear
    with pytest.raises(CodecError, match="not linear"):
        per_worker.aggregate(ps, w)


def test_onebit_recovery_quality_on_sparse_vector():
    # d = 1000, 5-sparse, M = 512 one-bit measurements (one block of 1024): measured cosines
    # lp ~0.95, biht ~0.998 (dither-aware BIHT also recovers the norm), adjoint ~0.5 (unbiased, noisy).
    x = _sparse(seed=0)
    lp = make_codec("onebit_cs", dim=D, measurements=512, recovery="lp", block=256)
    bi = make_codec("onebit_cs", dim=D, measurements=512, recovery="biht", sparsity=5)
    x_lp = lp.decode(lp.encode(x, seed=2), seed=2)
    x_bi = bi.decode(bi.encode(x, seed=2), seed=2)
    assert _cos(x_lp, x) > 0.85
    assert _cos(x_bi, x) > 0.95 and abs(float(x_bi.norm() / x.norm()) - 1) < 0.15
    assert lp.m == 512 and lp.k == 128  # 4 blocks of 256, 128 rows each


def test_onebit_block_rounds_measurements_to_blocks():
    codec = make_codec("onebit_cs", dim=D, measurements=500, block=256)  # B = 4 blocks -> k = 125
    assert (codec.blocks, codec.k, codec.m) == (4, 125, 500)
    codec = make_codec("onebit_cs", dim=D, measurements=510, block=256)
    assert codec.m == 508 and codec.encode(torch.ones(D), seed=0).bits == 508 + 4 * 32
    tiny = make_codec("onebit_cs", dim=3, measurements=2, recovery="lp")
    x = torch.tensor([0.0, -1.0, 0.0])
    out = tiny.decode(tiny.encode(x, seed=0), seed=0)
    assert torch.isfinite(out).all() and out.shape == (3,)


def test_onebit_rejects_non_bit_payload():
    codec = make_codec("onebit_cs", dim=D, measurements=64)
    p = codec.encode(_sparse(), seed=0)
    q = p.tensors["q"].clone()
    q[0] = 7
    with pytest.raises(PayloadError, match="bits"):
        codec.decode(Payload(p.codec, D, {**p.tensors, "q": q}, p.bits), seed=0)
    with pytest.raises(PayloadError, match="rho"):
        codec.decode(Payload(p.codec, D, {**p.tensors, "rho": torch.tensor([-1.0])}, p.bits), seed=0)


@pytest.mark.parametrize("name,params,key", [("count_sketch", dict(rows=3, cols=20, k=5), "table"),
                                             ("cs_fiht", dict(measurements=50, sparsity=5), "y")])
def test_linear_codecs_check_values(name, params, key):
    from fl_sim.compression import Payload, PayloadError

    codec = make_codec(name, dim=D, **params)
    good = codec.encode(torch.randn(D), seed=1)
    codec.check_values(good)
    t = good.tensors[key]
    for bad in (t.clone().fill_(float("inf")), t.reshape(-1)[:-1].clone(), t.double()):
        with pytest.raises(PayloadError):
            codec.check_values(Payload(good.codec, good.dim, {key: bad}, good.bits))
