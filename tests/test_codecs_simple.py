"""Codec contract for the codecs of simple.py, qcs.py and dataq.py: shapes, seeded determinism, exact
bits against the documented formulas, input and payload errors, degenerate inputs, make_codec errors.
"""

import dataclasses
import math

import pytest
import torch

from fl_sim.compression import CodecError, Payload, PayloadError, make_codec
from fl_sim.compression.coding import gap_encode_stream, qsgd_encode_stream
from fl_sim.compression.dataq import dataq_bits
from fl_sim.rng import torch_generator

D = 1000  # not a power of 2
SEGMENTS = [600, 300, 90, 10]  # tensor sizes: buckets of 128 give 5 + 3 + 1 + 1 = 10 norms

# name -> (params, documented bits at dim D)
CASES = {
    "identity": ({}, 32 * D),
    "fp16": ({}, 16 * D),
    "topk": ({"k": 10}, 10 * (32 + 10)),
    "randk": ({"k": 10}, 32 * 10),
    "randk_unbiased": ({"k": 10, "unbiased": True}, 32 * 10),
    "qsgd": ({"levels": 4, "coding": "fixed"}, 32 + D * (1 + 3)),
    "qsgd_elias": ({"levels": 4}, None),  # None: the length of the real Elias stream (checked below)
    "qsgd_tensor": ({"levels": 4, "segments": SEGMENTS, "coding": "fixed"}, 4 * 32 + D * (1 + 3)),
    "qsgd_bucket": ({"levels": 4, "segments": SEGMENTS, "bucket": 128, "coding": "fixed"}, 10 * 32 + D * 4),
    "sign": ({}, 32 + D),
    "sign_tensor": ({"segments": SEGMENTS}, 4 * 32 + D),
    "terngrad": ({}, 32 + 2 * D),
    "terngrad_tensor": ({"segments": SEGMENTS}, 4 * 32 + 2 * D),
    "terngrad_noclip": ({"segments": SEGMENTS, "clip_sigma": None}, 4 * 32 + 2 * D),
    "topk_tensor": ({"k": 10, "segments": SEGMENTS, "granularity": "tensor"}, 10 * (32 + 10)),
    "topk_elias": ({"k": 10, "index_coding": "elias"}, None),
    "qcs": ({"block": 256, "k": 32, "levels": 2}, 4 * 32 + 4 * 32 * 3),
    "qcs_1bit": ({"block": 128, "k": 16, "levels": 0.5}, 8 * 32 + 8 * 16 * 1),
    "qcs_mmse": ({"block": 64, "k": 8, "levels": 4, "alpha": "mmse"}, 16 * 32 + 16 * 8 * 4),
    "rlc": ({"m": 100}, 32 * 100),
    "dataq": ({"levels": 8, "mode": "per_feature", "features": 50}, 32 + D * 4),
    "dataq_exact": ({"levels": 4, "mode": "exact", "features": 50}, 20 * (32 + dataq_bits(50, 4))),
}
RANDOMIZED = {"randk", "randk_unbiased", "qsgd", "qsgd_elias", "qsgd_tensor", "qsgd_bucket", "terngrad",
              "terngrad_tensor", "terngrad_noclip", "qcs", "qcs_1bit", "qcs_mmse", "rlc"}


def _codec(case: str, dim: int = D):
    name = case.split("_")[0]
    return make_codec(name, dim=dim, **CASES[case][0])


def _x(dim: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(dim, generator=torch_generator(seed, "x"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_shape_bits_and_seeded_determinism(case):
    codec, x = _codec(case), _x()
    p = codec.encode(x, seed=11)
    assert isinstance(p, Payload) and p.codec == codec.name and p.dim == D
    if CASES[case][1] is None:  # a data-dependent code: bits = length of the real encoded stream
        if codec.name == "qsgd":
            stream, nbits = qsgd_encode_stream(p.tensors["norm"], p.tensors["q"])
        else:  # top-k: k float32 values + the Elias-coded index gaps
            stream, nbits = gap_encode_stream(p.tensors["indices"])
            nbits += 32 * codec.k
        assert p.bits == nbits and len(stream) * 8 >= p.bits - 32 * getattr(codec, "k", 0) * (codec.name == "topk")
    else:
        assert p.bits == CASES[case][1]
    y = codec.decode(p, seed=11)
    assert y.shape == (D,) and y.dtype == torch.float32 and torch.isfinite(y).all()
    p2 = codec.encode(x, seed=11)
    assert all(torch.equal(p.tensors[k], p2.tensors[k]) for k in p.tensors)
    assert torch.equal(codec.decode(p2, seed=11), y)
    if case in RANDOMIZED:
        p3 = codec.encode(x, seed=12)
        assert not all(torch.equal(p.tensors[k], p3.tensors[k]) for k in p.tensors)


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_errors(case):
    codec = _codec(case)
    with pytest.raises(CodecError, match="length"):
        codec.encode(torch.zeros(D + 1), seed=0)
    with pytest.raises(CodecError, match="1-D"):
        codec.encode(torch.zeros(2, D // 2), seed=0)
    with pytest.raises(CodecError, match="floating"):
        codec.encode(torch.zeros(D, dtype=torch.int32), seed=0)
    for bad in (math.nan, math.inf):
        x = _x()
        x[3] = bad
        with pytest.raises(CodecError, match="NaN or inf"):
            codec.encode(x, seed=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_payloads(case):
    codec, x = _codec(case), _x()
    p = codec.encode(x, seed=5)
    with pytest.raises(PayloadError):
        codec.decode(dataclasses.replace(p, codec="other"), seed=5)
    with pytest.raises(PayloadError):
        codec.decode(dataclasses.replace(p, dim=D + 1), seed=5)
    with pytest.raises(PayloadError):
        codec.decode("not a payload", seed=5)
    for key, t in p.tensors.items():
        with pytest.raises(PayloadError):
            codec.decode(dataclasses.replace(p, tensors={k: v for k, v in p.tensors.items() if k != key}), seed=5)
        with pytest.raises(PayloadError):
            codec.decode(dataclasses.replace(p, tensors={**p.tensors, key: t[:-1]}), seed=5)
        with pytest.raises(PayloadError):
            codec.decode(dataclasses.replace(p, tensors={**p.tensors, key: t.to(torch.float64)}), seed=5)
        if torch.is_floating_point(t):
            bad = t.clone()
            bad.view(-1)[0] = math.nan
            with pytest.raises(PayloadError):
                codec.decode(dataclasses.replace(p, tensors={**p.tensors, key: bad}), seed=5)
        else:  # out-of-range integer levels / indices
            bad = t.clone()
            bad.view(-1)[0] = torch.iinfo(t.dtype).max
            with pytest.raises(PayloadError):
                codec.decode(dataclasses.replace(p, tensors={**p.tensors, key: bad}), seed=5)


def _degenerate_inputs():
    single = torch.zeros(D)
    single[417] = -3.0
    return {
        "zero": torch.zeros(D),
        "single": single,
        "tiny": _x(seed=1) * 1e-30,
        "subnormal": torch.full((D,), 1e-42),
        "huge": _x(seed=2) * 1e30,
        "float16": _x(seed=3).to(torch.float16),
        "float64": _x(seed=4).to(torch.float64),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_degenerate_inputs_never_nan(case):
    codec = _codec(case)
    for what, x in _degenerate_inputs().items():
        if case == "fp16" and what == "huge":
            with pytest.raises(CodecError, match="float16"):
                codec.encode(x, seed=1)
            continue
        y = codec.decode(codec.encode(x, seed=1), seed=1)
        assert torch.isfinite(y).all(), (case, what)
        if what == "zero":
            assert (y == 0).all(), case
    if case in ("identity", "topk"):  # exact on what they keep
        y = codec.decode(codec.encode(_degenerate_inputs()["single"], seed=1), seed=1)
        assert y[417] == -3.0 and (y.abs() > 0).sum() == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_small_non_power_of_two_dims(case):
    params = dict(CASES[case][0])
    name = case.split("_")[0]
    for dim in (1, 3, 37):
        p = {k: v for k, v in params.items() if k not in ("block", "features", "k", "m", "segments")}
        if name in ("topk", "randk"):
            p["k"] = 1
        if name == "rlc":
            p["m"] = 8  # m > d is allowed: n = next_pow2(max(d, m))
        codec = make_codec(name, dim=dim, **p)
        x = torch.arange(1.0, dim + 1)
        y = codec.decode(codec.encode(x, seed=2), seed=2)
        assert y.shape == (dim,) and torch.isfinite(y).all()


def test_k_larger_than_dim_or_block_is_a_clear_error():
    with pytest.raises(CodecError, match="k must be an int in 1..10"):
        make_codec("topk", dim=10, k=11)
    with pytest.raises(CodecError, match="k must be an int in 1..10"):
        make_codec("randk", dim=10, k=0)
    with pytest.raises(CodecError, match="1..block=64"):
        make_codec("qcs", dim=1000, block=64, k=65)
    with pytest.raises(CodecError, match="power of 2"):
        make_codec("qcs", dim=1000, block=100)
    with pytest.raises(CodecError, match="alpha"):
        make_codec("qcs", dim=1000, alpha="best")


def test_unknown_parameter_lists_allowed_ones():
    with pytest.raises(CodecError, match=r"allowed parameters: block, k, levels, alpha"):
        make_codec("qcs", dim=64, rows=3)
    with pytest.raises(CodecError, match=r"allowed parameters: k, unbiased"):
        make_codec("randk", dim=64, kk=3)
    with pytest.raises(CodecError, match=r"allowed parameters: none"):
        make_codec("identity", dim=64, k=3)


def test_exact_values_identity_fp16_topk_sign():
    x = torch.tensor([0.5, -2.0, 0.25, 3.0, 0.0, -0.25])
    assert torch.equal(make_codec("identity", dim=6).decode(make_codec("identity", dim=6).encode(x, seed=0), seed=0), x)
    fp = make_codec("fp16", dim=6)
    assert torch.equal(fp.decode(fp.encode(x, seed=0), seed=0), x)  # all exactly representable in fp16
    tk = make_codec("topk", dim=6, k=2)
    assert tk.decode(tk.encode(x, seed=0), seed=0).tolist() == [0, -2.0, 0, 3.0, 0, 0]
    sg = make_codec("sign", dim=6)
    assert sg.decode(sg.encode(x, seed=0), seed=0).tolist() == pytest.approx([1, -1, 1, 1, 1, -1])  # ||x||_1/6 = 1


def test_randk_unbiased_over_seeds_and_biased_variant_keeps_values():
    d, k, trials = 20, 5, 2000
    x = _x(d, seed=9)
    c = make_codec("randk", dim=d, k=k, unbiased=True)
    mean = torch.stack([c.decode(c.encode(x, seed=s), seed=s) for s in range(trials)]).mean(0)
    # x_hat_i = (d/k) x_i w.p. k/d else 0: Var = x_i^2 (d/k - 1); SE = |x_i| sqrt((d/k - 1)/trials)
    assert ((mean - x).abs() <= 5 * x.abs() * math.sqrt((d / k - 1) / trials) + 1e-6).all()
    b = make_codec("randk", dim=d, k=k)
    y = b.decode(b.encode(x, seed=3), seed=3)
    kept = y != 0
    assert kept.sum() == k and torch.equal(y[kept], x[kept])


def test_qsgd_and_terngrad_codecs_unbiased_over_seeds():
    d, trials = 16, 1000
    x = _x(d, seed=10)
    # TernGrad is unbiased for its clipped input: clipping off here; per-tensor scales (segments) as well
    for name, params in (("qsgd", {"levels": 2}), ("terngrad", {"clip_sigma": None}),
                         ("qsgd", {"levels": 2, "segments": [10, 6]}),
                         ("terngrad", {"clip_sigma": None, "segments": [10, 6]})):
        c = make_codec(name, dim=d, **params)
        ys = torch.stack([c.decode(c.encode(x, seed=s), seed=s) for s in range(trials)])
        # per coordinate SE from the sample std of the trials; 5 SE (+ float32 slack)
        se = ys.std(0) / math.sqrt(trials)
        assert ((ys.mean(0) - x).abs() <= 5 * se + 1e-5).all(), name
    assert make_codec("qsgd", dim=d, levels=2).variance_bound == min(d / 4, math.sqrt(d) / 2)


@pytest.mark.parametrize("name", ["identity", "fp16", "topk", "randk", "qsgd", "sign", "terngrad", "qcs", "rlc",
                                  "cs_fiht", "onebit_cs", "count_sketch"])
def test_declared_payload_spec_matches_what_encode_sends(name):
    """Each codec declares its payload (the server validates replies against the declaration
    instead of encoding a zero vector every round): names, shapes and dtypes equal a real payload's, for
    two seeds, and validate_payload accepts it and rejects a tensor of the wrong shape or an extra one."""
    from fl_sim.compression import PayloadError, make_codec

    params = {"topk": {"k": 30}, "randk": {"k": 30}, "cs_fiht": {"measurements": 100, "sparsity": 10},
              "onebit_cs": {"measurements": 100}, "count_sketch": {"rows": 3, "cols": 50, "k": 10}}.get(name, {})
    codec = make_codec(name, dim=300, **params)
    from fl_sim.compression import Codec

    assert type(codec).payload_spec is not Codec.payload_spec  # declared by the codec, not read off an encoding
    x = torch.randn(300, generator=torch.Generator().manual_seed(1))
    for seed in (3, 4):
        p = codec.encode(x, seed=seed)
        assert {k: (tuple(t.shape), t.dtype) for k, t in p.tensors.items()} == codec.payload_spec()
        codec.validate_payload(p)
    name0 = next(iter(p.tensors))
    bad = dict(p.tensors)
    bad[name0] = bad[name0].reshape(-1)[:-1]
    with pytest.raises(PayloadError):
        codec.validate_payload(type(p)(p.codec, p.dim, bad, p.bits, p.meta))
    with pytest.raises(PayloadError, match="unexpected"):
        codec.validate_payload(type(p)(p.codec, p.dim, {**p.tensors, "extra": torch.zeros(1)}, p.bits, p.meta))
