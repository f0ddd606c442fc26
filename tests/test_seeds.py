"""Common vs per-client codec randomness, OneBitCS ([Mitra-Khisti-2020]) fidelity, QCS blocks.

Statistical tests use fixed seeds and tolerances derived from the Monte-Carlo standard error (stated
at each test). Each test fails on the earlier codecs (one seed per round for every client, one
shared dither with a common Phi, one scale for the whole vector, Phi redrawn every round, QCS blocks
across tensor boundaries).
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_sim.wire import keys
from fl_sim.clients.mods import compression_mod
from fl_sim.compression import Payload, PayloadError, Seeds, make_codec
from fl_sim.compression.base import CodecError, check_seed, client_round_seed
from fl_sim.wire.protocol import codec_seeds
from fl_sim.wire.records import flatten_arrays
from fl_sim.strategies import strategy_class
from fl_sim.strategies.compressed import CompressedFedAvg
from fl_sim.strategies.onebit import OneBitCS
from fl_sim.testing import InMemoryGrid


def _randn(d: int, seed: int) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _ratio_and_se(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """mean(a) / mean(b) and its standard error by the delta method over T trials.

    se(R)^2 ~ R^2 (var(a) / (T mean(a)^2) + var(b) / (T mean(b)^2)); the covariance term is left out:
    a and b are positively correlated here (b's client is one of a's), which only makes the se larger.
    """
    t = a.numel()
    r = float(a.mean() / b.mean())
    se = r * math.sqrt(float(a.var()) / (t * float(a.mean()) ** 2) + float(b.var()) / (t * float(b.mean()) ** 2))
    return r, se


# ------------------------------------------------------------------------------------------------ contract
def test_seeds_contract_and_single_client_compatibility():
    x = _randn(300, 0)
    for name, params, scope in [("qcs", dict(block=64, k=16), "client"), ("qsgd", dict(levels=4), "client"),
                                ("randk", dict(k=30), "client"), ("rlc", dict(m=40), "common"),
                                ("count_sketch", dict(rows=3, cols=50, k=10), "common"),
                                ("cs_fiht", dict(measurements=60), "common"),
                                ("onebit_cs", dict(measurements=256, block=64), "mixed")]:
        codec = make_codec(name, dim=300, **params)
        assert codec.seed_scope == scope, name
        # a single client (client None): encode_seeded is encode(x, seed=s)
        a, b = codec.encode_seeded(x, Seeds(7)), codec.encode(x, seed=7)
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), name
        c0, c1 = codec.encode_seeded(x, Seeds(7, 0)), codec.encode_seeded(x, Seeds(7, 1))
        same = all(torch.equal(c0.tensors[k], c1.tensors[k]) for k in c0.tensors)
        assert same == (scope == "common"), name  # own randomness differs between clients, common does not
    assert client_round_seed(5, None) == 5 and client_round_seed(5, 1) != client_round_seed(5, 2)
    with pytest.raises(CodecError, match="seed must be an int"):
        check_seed(True, "x")
    assert codec_seeds(9, "per_client", 3) == Seeds(9, 3) and codec_seeds(9, "shared", 3) == Seeds(9, None)
    with pytest.raises(ValueError, match="seed_mode"):
        codec_seeds(9, "each", 3)


def test_per_client_is_the_default_everywhere_and_shared_is_an_option():
    assert CompressedFedAvg().seed_mode == "per_client"
    for name in ("qcs", "onebit_cs", "rlc"):
        assert strategy_class(name)().seed_mode == "per_client", name  # qcs: also the RLC digital baseline
    assert CompressedFedAvg(seed_mode="shared").seed_mode == "shared"
    with pytest.raises(ValueError, match="seed_mode"):
        CompressedFedAvg(seed_mode="per_round")


# ------------------------------------------------------------------------ per-client randomness
@pytest.mark.parametrize("mode", ["per_client", "shared"])
def test_qcs_aggregate_mse_falls_as_one_over_k_only_with_per_client_randomness(mode):
    # K clients encode the same x; the server averages their decodes. Unbiased QCS with independent
    # randomness: e_i = g_hat_i - x i.i.d. with mean 0, so E||mean_i e_i||^2 = E||e_1||^2 / K exactly.
    # With one seed for all, every client's decode is identical and the ratio is 1. Over T = 120 trials
    # (fixed seeds), R = mean ||e_bar||^2 / mean ||e_1||^2 has a delta-method se of ~0.015 for
    # 1/K = 0.125: |R - 1/K| < 4 se is a 4-sigma two-sided bound (and far from the shared ratio 1).
    d, K, T = 256, 8, 120
    codec = make_codec("qcs", dim=d, block=64, k=16, levels=2)
    x = _randn(d, 1)
    e1, ek = torch.empty(T), torch.empty(T)
    for t in range(T):
        seed = 10_000 + t
        outs = torch.stack([codec.decode_seeded(codec.encode_seeded(x, s), s)
                            for s in (codec_seeds(seed, mode, cid) for cid in range(K))])
        e1[t] = (outs[0] - x).pow(2).sum()
        ek[t] = (outs.mean(0) - x).pow(2).sum()
    r, se = _ratio_and_se(ek, e1)
    if mode == "per_client":
        assert abs(r - 1 / K) < 4 * se, (r, se)
    else:
        assert r == pytest.approx(1.0, abs=1e-6)  # identical errors: averaging does not help


class _SameUpdate:
    """A ClientApp whose every client returns received + delta (the same update for all)."""

    def __init__(self, delta: torch.Tensor) -> None:
        self.app = ClientApp(mods=[compression_mod])

        @self.app.train()
        def _train(msg: Message, context) -> Message:
            cid = int(msg.content[keys.CONFIG][keys.CID])
            w = flatten_arrays(msg.content[keys.ARRAYS])
            arrays = ArrayRecord({"w": Array((w + delta).numpy())})
            metrics = MetricRecord({keys.NUM_EXAMPLES: 10, keys.TRAIN_LOSS: 0.0, keys.M_CID: cid})
            return Message(content=RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=msg)


@pytest.mark.parametrize("mode", ["per_client", "shared"])
def test_strategy_and_client_mod_derive_the_same_seeds_and_errors_average_out(mode):
    # Through the real message path (configure_train -> compression_mod -> aggregate_train): K clients
    # send the same delta; the server's decode must use each client's own seeds (a mismatch would give
    # an error of order gamma ||delta||^2 per client, not below it) and, per client, the aggregate's
    # error is ~1/K of one client's. One client's relative error is gamma-like: E = (n/k - 1) + dither
    # ~ 3.2 here (Theorem 7 bound gamma = 3.84). Over R = 30 rounds the mean of the K = 8 aggregate
    # is 3.2/8 = 0.40 +- ~0.06 (per-round relative errors have sd ~0.3 / sqrt(30)); shared stays ~3.2.
    d, K, R = 256, 8, 30
    delta = _randn(d, 2)
    strategy = CompressedFedAvg(codec="qcs", codec_params=dict(block=64, k=16, levels=2), seed_mode=mode,
                                client_ids=list(range(K)), clients_per_round=K, seed=3)
    grid = InMemoryGrid(_SameUpdate(delta).app, K)
    errs = []
    for rnd in range(1, R + 1):
        arrays = ArrayRecord({"w": Array(torch.zeros(d).numpy())})
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        new, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        errs.append(float((flatten_arrays(new) - delta).pow(2).sum() / delta.pow(2).sum()))
    mean = sum(errs) / R
    if mode == "per_client":
        assert mean < 0.6, mean
    else:
        assert mean > 2.0, mean


# ------------------------------------------------------------------------ OneBitCS fidelity
def test_onebit_common_phi_has_each_workers_own_dither():
    # phi="common": one Phi for all, but u_i is client i's own. The aggregate's dequantized measurements
    # v_bar = sum_i w_i v_hat_i have error sum_i w_i rho_i eps_i, eps_i ~ U(-1/2, 1/2) independent: with
    # equal rho (same x) and w_i = 1/K, E||v_bar - v||^2 = E||v_hat_1 - v||^2 / K. With one shared u the
    # errors are identical (ratio 1). T = 100 trials, 4-sigma delta-method bound as above.
    d, K, T = 256, 8, 100
    codec = make_codec("onebit_cs", dim=d, measurements=256, phi="common", block=64)
    x = _randn(d, 4)
    e1, ek = torch.empty(T), torch.empty(T)
    for t in range(T):
        seed = 20_000 + t
        seeds = [Seeds(seed, c) for c in range(K)]
        ps = [codec.encode_seeded(x, s) for s in seeds]
        v = codec.operator(seed).forward(x)
        e1[t] = (codec.dequantize(ps[0], seed=seed, client_seed=0) - v).pow(2).sum()
        agg = codec.aggregate_seeded(ps, [1 / K] * K, seeds)
        assert torch.equal(agg.tensors["rho_sum"], torch.zeros(codec.blocks))  # every dither removed
        ek[t] = (codec.dequantize(agg, seed=seed) - v).pow(2).sum()
    r, se = _ratio_and_se(ek, e1)
    assert abs(r - 1 / K) < 4 * se, (r, se)
    # the decode of the aggregate is Phi^T of those measurements (one recovery)
    torch.testing.assert_close(codec.decode_seeded(agg, Seeds(seed)), codec.operator(seed).adjoint(codec.dequantize(agg, seed=seed)))
    # legacy seed_mode="shared": all clients use the dither of the round seed, removed at decode
    shared = [Seeds(seed)] * K
    ps = [codec.encode_seeded(x, s) for s in shared]
    assert all(torch.equal(p.tensors["q"], ps[0].tensors["q"]) for p in ps)
    agg = codec.aggregate_seeded(ps, [1 / K] * K, shared)
    torch.testing.assert_close(codec.dequantize(agg, seed=seed), codec.dequantize(ps[0], seed=seed), rtol=1e-5, atol=1e-6)


def test_onebit_per_block_scales():
    # rho_b = 2 ||v_b||_inf per block (the docstring's "one scale per block"); bits m + 32 B. The error
    # of block b is bounded by its own rho_b / 2 (a single scale bounded every block by the largest), and
    # E||v_hat - v||^2 = sum_b k rho_b^2 / 12 (uniform error per measurement). Block magnitudes span
    # 10^-2..10^2. Monte-Carlo over T = 400 dithers: the squared error is a sum of m = 512 independent
    # U^2 terms, so its mean over T has relative sd sqrt(Var(U^2)/E[U^2]^2 / (m T)) <= 0.9 / sqrt(m T)
    # (all of the error in one block: sqrt(0.8 / (k T)) = 0.011 at k = 64): 5% is > 4 sigma.
    d, n, T = 512, 64, 400
    codec = make_codec("onebit_cs", dim=d, measurements=512, block=n, phi="common")  # Phi from seed only
    assert (codec.blocks, codec.k) == (8, 64) and codec.nominal_bits() == 512 + 32 * 8
    x = _randn(d, 5) * torch.logspace(-2, 2, 8).repeat_interleave(n)
    v = codec.operator(0).forward(x).view(8, 64)
    sq = torch.empty(T)
    for t in range(T):
        p = codec.encode(x, seed=0, client_seed=t)  # the same Phi (phi from seed), a new dither each time
        assert p.bits == 512 + 32 * 8
        rho = p.tensors["rho"]
        torch.testing.assert_close(rho, 2 * v.abs().amax(dim=1), rtol=1e-6, atol=0)
        err = (codec.dequantize(p, seed=0, client_seed=t).view(8, 64) - v).abs()
        assert bool((err <= rho[:, None] / 2 * (1 + 1e-5)).all())
        sq[t] = err.pow(2).sum()
    expected = float((64 * rho.double() ** 2 / 12).sum())
    assert abs(float(sq.mean()) / expected - 1) < 0.05


def test_onebit_phi_fixed_a_priori_per_worker_or_redrawn_per_round():
    # Mitra & Khisti eq. (10) text: the PS knows Phi^(k) a priori. phi_seed fixes it for the run:
    # per worker it is the same in every round and differs between workers; the dither is new each round.
    fixed = make_codec("onebit_cs", dim=300, measurements=256, block=64, phi_seed=11)
    rnd = make_codec("onebit_cs", dim=300, measurements=256, block=64, phi_schedule="round")
    r1, r2 = 101, 202  # two rounds' common seeds
    assert torch.equal(fixed.operator(r1, 3).rows, fixed.operator(r2, 3).rows)
    assert torch.equal(fixed.operator(r1, 3).signs, fixed.operator(r2, 3).signs)
    assert not torch.equal(fixed.operator(r1, 3).signs, fixed.operator(r1, 4).signs)
    assert not torch.equal(fixed.dither(r1, 3), fixed.dither(r2, 3))
    assert not torch.equal(rnd.operator(r1, 3).signs, rnd.operator(r2, 3).signs)
    common = make_codec("onebit_cs", dim=300, measurements=256, block=64, phi="common", phi_seed=11)
    assert torch.equal(common.operator(r1, 3).signs, common.operator(r2, 4).signs)
    assert not torch.equal(common.dither(r1, 3), common.dither(r1, 4))
    # the strategy: fixed a priori by default (the paper), "round" as an option
    assert "phi_seed" in OneBitCS(seed=1).codec_params
    assert OneBitCS(seed=1).codec_params["phi_seed"] != OneBitCS(seed=2).codec_params["phi_seed"]
    assert "phi_seed" not in OneBitCS(phi_schedule="round").codec_params
    assert OneBitCS(phi_schedule="round").codec_params["phi_schedule"] == "round"
    with pytest.raises(ValueError, match="phi_schedule"):
        OneBitCS(phi_schedule="never")


def test_onebit_codec_default_fixes_phi_a_priori_as_the_strategy():
    # One default, the paper's (Mitra & Khisti eq. 10 text, "Phi^(k) known a priori"): a bare
    # make_codec("onebit_cs") keeps Phi over rounds, and it is the Phi of OneBitCS(seed=0).
    from fl_sim.compression.codecs.sensing import PHI_SEED_DEFAULT

    bare = make_codec("onebit_cs", dim=300, measurements=256, block=64)
    assert bare.phi_schedule == "fixed" and bare.phi_seed == PHI_SEED_DEFAULT
    for phi in ("per_worker", "common"):
        c = make_codec("onebit_cs", dim=300, measurements=256, block=64, phi=phi)
        assert torch.equal(c.operator(101, 3).signs, c.operator(202, 3).signs)
        assert torch.equal(c.operator(101, 3).rows, c.operator(202, 3).rows)
    strat = OneBitCS(seed=0, block=64)
    assert strat.codec_params["phi_seed"] == PHI_SEED_DEFAULT
    assert strat.codec_params["phi_schedule"] == "fixed"
    with pytest.raises(CodecError, match="phi_schedule"):
        make_codec("onebit_cs", dim=300, measurements=256, phi_schedule="every")
    with pytest.raises(CodecError, match="phi_seed"):
        make_codec("onebit_cs", dim=300, measurements=256, phi_schedule="round", phi_seed=3)


def test_onebit_compressive_regime_beats_m_equals_d_on_sparse_updates():
    # Mitra & Khisti's regime: M < d measurements, sparse recovery. On 20-sparse vectors (d = 2048),
    # M = d/2 with dither-aware BIHT has less error than M = d with the adjoint, at half the bits
    # (measured over 10 vectors: ~0.4 vs ~3.5 relative squared error, one block each).
    d, T = 2048, 10
    full = make_codec("onebit_cs", dim=d, measurements=d)
    half = make_codec("onebit_cs", dim=d, measurements=d // 2, recovery="biht", sparsity=20)
    assert half.nominal_bits() < full.nominal_bits()
    e_full = e_half = 0.0
    for t in range(T):
        g = torch.Generator().manual_seed(30 + t)
        x = torch.zeros(d)
        x[torch.randperm(d, generator=g)[:20]] = torch.randn(20, generator=g)
        for codec, acc in ((full, "f"), (half, "h")):
            err = float((codec.decode(codec.encode(x, seed=t, client_seed=1), seed=t, client_seed=1) - x).pow(2).sum()
                        / x.pow(2).sum())
            if acc == "f":
                e_full += err / T
            else:
                e_half += err / T
    assert e_half < 0.5 * e_full, (e_half, e_full)


def test_onebit_check_values():
    codec = make_codec("onebit_cs", dim=300, measurements=256, block=64)
    p = codec.encode(_randn(300, 6), seed=1)
    codec.check_values(p)
    with pytest.raises(PayloadError, match="bits"):
        codec.check_values(Payload(p.codec, 300, {**p.tensors, "q": p.tensors["q"] * 3}, p.bits))
    with pytest.raises(PayloadError, match="rho"):
        codec.check_values(Payload(p.codec, 300, {**p.tensors, "rho": -p.tensors["rho"] - 1}, p.bits))
    with pytest.raises(PayloadError, match="rho"):
        codec.check_values(Payload(p.codec, 300, {**p.tensors, "rho": p.tensors["rho"][:-1]}, p.bits))


# ------------------------------------------------------------------------ QCS blocks inside tensors
def test_qcs_tensor_granularity_blocks_stay_inside_tensors():
    # segments 100 + 30 + 200 with n = 64: tensor-aligned blocks 2 + 1 + 4 = 7 (vector: ceil(330/64) = 6).
    segs = [100, 30, 200]
    d = sum(segs)
    tensor = make_codec("qcs", dim=d, block=64, k=64, levels=2, segments=segs)
    vector = make_codec("qcs", dim=d, block=64, k=64, levels=2, segments=segs, granularity="vector")
    assert tensor.granularity == "tensor" and (tensor.blocks, vector.blocks) == (7, 6)
    for codec in (tensor, vector):
        p = codec.encode(_randn(d, 7), seed=3)
        assert p.bits == codec.blocks * (32 + 64 * 3) and p.tensors["q"].shape == (codec.blocks, 64)
    # k = n: T_b is orthogonal up to n/k = 1, so decode is exact up to the dither; with only the second
    # tensor nonzero, only its block has a nonzero scale in tensor granularity (it shares none)
    x = torch.zeros(d)
    x[100:130] = _randn(30, 8)
    p = tensor.encode(x, seed=3)
    assert torch.count_nonzero(p.tensors["scale"]) == 1 and float(p.tensors["scale"][2]) > 0
    out = tensor.decode(p, seed=3)
    assert float(out[:100].abs().max()) == 0 and float(out[130:].abs().max()) == 0
    assert torch.count_nonzero(vector.encode(x, seed=3).tensors["scale"]) == 2  # block 1 (64..127) and 2 (128..)
    # one segment (or none) is the vector layout, stream for stream
    one = make_codec("qcs", dim=d, block=64, k=16, segments=[d])
    flat = make_codec("qcs", dim=d, block=64, k=16, granularity="vector")
    assert torch.equal(one.encode(x, seed=1).tensors["q"], flat.encode(x, seed=1).tensors["q"])
    with pytest.raises(CodecError, match="segments sum"):
        make_codec("qcs", dim=d, segments=[1, 2])
    with pytest.raises(CodecError, match="granularity"):
        make_codec("qcs", dim=d, granularity="layer")


def test_qcs_tensor_granularity_is_unbiased():
    # Unbiased QCS stays unbiased with tensor-aligned blocks (Theorem 7 P1 per block): the mean over
    # T = 600 seeds is within 5 standard errors of x in every coordinate.
    segs, T = [40, 9, 70], 600
    d = sum(segs)
    codec = make_codec("qcs", dim=d, block=32, k=8, levels=2, segments=segs)
    x = _randn(d, 9)
    outs = torch.stack([codec.decode(codec.encode(x, seed=s), seed=s) for s in range(T)])
    se = outs.std(0) / math.sqrt(T)
    assert bool(((outs.mean(0) - x).abs() < 5 * se).all())


def test_qcs_and_rlc_check_values():
    codec = make_codec("qcs", dim=100, block=32, k=8, levels=2)
    p = codec.encode(_randn(100, 10), seed=1)
    codec.check_values(p)
    with pytest.raises(PayloadError, match="levels"):
        codec.check_values(Payload(p.codec, 100, {**p.tensors, "q": p.tensors["q"] * 3}, p.bits))
    with pytest.raises(PayloadError, match="scale"):
        codec.check_values(Payload(p.codec, 100, {**p.tensors, "scale": -p.tensors["scale"] - 1}, p.bits))
    with pytest.raises(PayloadError, match="scale"):
        codec.check_values(Payload(p.codec, 100, {**p.tensors, "scale": p.tensors["scale"] * float("inf")}, p.bits))
    rlc = make_codec("rlc", dim=100, m=10)
    rlc.check_values(rlc.encode(_randn(100, 11), seed=1))
    with pytest.raises(PayloadError, match="finite"):
        rlc.check_values(Payload("rlc", 100, {"y": torch.full((10,), float("nan"))}, 320))
