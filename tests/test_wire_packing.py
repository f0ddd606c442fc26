"""The wire carries what fl-sim counts: packed payload arrays, their strict unpacking, the server's count.

* every codec: 8 x (data bytes of the reply's arrays) <= Payload.bits + 7 x (number of arrays): only byte
  padding separates the wire from the codec's exact count (before packing: 2-42x more);
* the wire round trip gives back the payload's tensors exactly (values and dtypes), so every decoded
  vector is bitwise the one decoded from the unpacked payload; for the deterministic element-wise codecs
  also bitwise equal to digests computed with the code before packing (stored below);
* a packed array with a wrong length, bad padding or a code outside the alphabet raises PayloadError, and
  the server's per-reply checks reject such a reply.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord

from fl_sim.wire import keys
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.clients.app import make_client_app
from fl_sim.compression import PayloadError, codec_names, make_codec
from fl_sim.compression.coding import elias_omega_codewords, pack_fields
from fl_sim.compression.packing import (
    check_ones_tail,
    index_bits,
    pack_indices,
    pack_uint,
    pad_ones,
    unpack_indices,
    unpack_uint,
    wire_bits,
)
from fl_sim.config import config_from_dict
from fl_sim.wire.records import payload_from_records, payload_to_records, read_array, read_payload
from fl_sim.strategies.base import ReplyError
from fl_sim.testing import InMemoryGrid

D = 1000
SEGS = [600, 400]  # two tensors

# case -> (codec, params); every registered codec appears at least once
CASES = {
    "identity": ("identity", {}),
    "fp16": ("fp16", {}),
    "topk": ("topk", {"k": 10, "segments": SEGS}),
    "topk_dense": ("topk", {"k": 400}),  # auto coding picks the fixed-width code
    "topk_fixed": ("topk", {"k": 37, "index_coding": "fixed"}),
    "topk_elias": ("topk", {"k": 37, "index_coding": "elias", "granularity": "tensor", "segments": SEGS}),
    "randk": ("randk", {"k": 10}),
    "qsgd": ("qsgd", {"levels": 4, "segments": SEGS}),
    "qsgd_bucket": ("qsgd", {"levels": 16, "segments": SEGS, "bucket": 128}),
    "qsgd_fixed": ("qsgd", {"levels": 4, "segments": SEGS, "coding": "fixed"}),
    "qsgd_fixed_s3": ("qsgd", {"levels": 3, "coding": "fixed"}),
    "sign": ("sign", {"segments": SEGS}),
    "terngrad": ("terngrad", {"segments": SEGS}),
    "qcs": ("qcs", {"block": 64, "k": 28, "levels": 2, "segments": SEGS}),
    "qcs_1bit": ("qcs", {"block": 64, "k": 28, "levels": 0.5}),
    "qcs_q7": ("qcs", {"block": 128, "k": 50, "levels": 7}),
    "onebit_cs": ("onebit_cs", {"measurements": 250}),
    "cs_fiht": ("cs_fiht", {"measurements": 200, "sparsity": 10}),
    "count_sketch": ("count_sketch", {"rows": 3, "cols": 50, "k": 10}),
    "rlc": ("rlc", {"m": 100}),
    "dataq": ("dataq", {"levels": 8, "mode": "per_feature", "features": 50}),
    "dataq_bound": ("dataq", {"levels": 5, "mode": "per_feature", "bound": 6.0}),
}
# sha256 of decode(encode(x, seed=7), seed=7) as float32 bytes, computed with fl-sim before packing (the
# unpacked payloads): element-wise codecs, whose arithmetic does not depend on BLAS or thread count.
DIGESTS_BEFORE = {
    "identity": "80929002f5dc2bd7070dec791783089b769396a4130709efa4040243cb255e7f",
    "fp16": "09cd527635121664efff8ca4441eea0ad7ce4b07b292b6917bbffec3fd8d069e",
    "topk": "c8578a252279cae187b95a8a71afa0f2650d03b76e8a24e3f5f8c913840c4ce4",
    "topk_dense": "dcec95b4656ab1d2d4459e363fce110e1f404b1caac36e01c1c85a8af8d24ca5",
    "topk_fixed": "b3d794c2f345d954b9bbe5ee6f529a52ebc4a6919257ea179f64997f47e3f4ce",
    "topk_elias": "164db32595a9c491c2c533ae7f586d93a0fffbfe9a4c88a2f594655a26fffd91",
    "randk": "4a1c283d9a97718a6fcd5a2d0f6b1aa998ca8c451b1acc19f63f13abfa6c1c13",
    "qsgd": "5e04b7959bc0563801a3f01dd07e5d8dff427a71543997dd933fd75fb9bd47a2",
    "qsgd_bucket": "981ecd5ff919b7a60ed7c512e2eff2d94645e7c89905812189929738e7e9ab26",
    "qsgd_fixed": "5e04b7959bc0563801a3f01dd07e5d8dff427a71543997dd933fd75fb9bd47a2",
    "qsgd_fixed_s3": "51ed5582b54736e31367c41dcf8e8d8ddcde67472c0244ac866624ca424c54ee",
    "sign": "96a7d5415906269648f19c763d9f5dccbfe88aa18806f71c037442abe1f7f9b5",
    "terngrad": "ecf59089f659b61d44fc84a3c2a690d1ababdbb7a9e9860eb70b02d9ccbd02d8",
    "dataq": "876b82cca3c52cf909d7a310029e087c2b251560d8123c175d7178775df22db3",
    "dataq_bound": "458be2bde83c81cfa718da5035c8e4f770a43f483e65b211e0d2b24612ddf9e3",
}


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, generator=g) * torch.rand(D, generator=g) ** 3  # heavy-ish tails, some tiny entries


def _codec(case: str):
    name, params = CASES[case]
    return make_codec(name, dim=D, **params)


def _encoded(case: str):
    codec = _codec(case)
    return codec, codec.encode(_x(), seed=7)


def _records_bytes(arrays) -> dict[str, np.ndarray]:
    return {k: read_array(a, k) for k, a in arrays.items()}


def test_every_codec_has_a_case():
    assert set(codec_names()) <= {name for name, _ in CASES.values()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wire_bytes_are_the_counted_bits_up_to_byte_padding(case):
    codec, p = _encoded(case)
    arrays, _ = payload_to_records(p, codec)
    received = _records_bytes(arrays)
    raw = 8 * sum(a.nbytes for a in received.values())
    assert p.bits <= raw <= p.bits + 7 * len(received), (p.bits, raw, {k: (a.dtype, a.shape) for k, a in received.items()})


@pytest.mark.parametrize("case", sorted(CASES))
def test_wire_round_trip_decodes_bitwise_as_before(case):
    codec, p = _encoded(case)
    arrays, meta = payload_to_records(p, codec)
    back, wire = read_payload(arrays, meta, codec)
    assert wire == wire_bits(_records_bytes(arrays).values())
    assert set(back.tensors) == set(p.tensors)
    for k, t in p.tensors.items():
        assert back.tensors[k].dtype == t.dtype and torch.equal(back.tensors[k], t), k
    codec.validate_payload(back)
    codec.check_values(back)
    before, after = codec.decode(p, seed=7), codec.decode(back, seed=7)
    assert torch.equal(before, after)
    if case in DIGESTS_BEFORE:
        assert hashlib.sha256(after.numpy().tobytes()).hexdigest() == DIGESTS_BEFORE[case]


@pytest.mark.parametrize("case", ["topk", "qsgd", "sign", "terngrad", "qcs", "onebit_cs", "qsgd_fixed"])
def test_batched_encode_packs_to_the_same_bytes(case):
    """A cohort's encode_batch payloads pack to the bytes of the per-client encodes."""
    from fl_sim.compression import Seeds

    codec = _codec(case)
    Z = torch.stack([_x(s) for s in range(3)])
    seeds = [Seeds(5, c) for c in range(3)]
    for i, p in enumerate(codec.encode_batch(Z, seeds)):
        one = codec.encode_seeded(Z[i], seeds[i])
        a, b = codec.wire_arrays(p), codec.wire_arrays(one)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_dataq_exact_sends_the_per_feature_code():
    """Documented departure: Theorem 1's enumerative index is not sent; the per-feature code is."""
    codec = make_codec("dataq", dim=D, levels=4, mode="exact", features=50)
    p = codec.encode(_x(), seed=0)
    arrays = codec.wire_arrays(p)
    assert 8 * arrays["level"].nbytes == 8 * math.ceil(D * math.ceil(math.log2(2 * 4 - 1)) / 8)
    back = codec.from_wire(arrays)
    assert all(torch.equal(back[k], p.tensors[k]) for k in p.tensors)


# ---------------------------------------------------------------- the packing layer
@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 11, 16, 17, 31, 32, 40])
def test_pack_uint_round_trip_and_length(width):
    rng = np.random.default_rng(width)
    codes = rng.integers(0, 2**width, size=1001, dtype=np.uint64).astype(np.int64) if width < 63 else None
    buf = pack_uint(codes, width)
    assert buf.dtype == np.uint8 and buf.size == math.ceil(1001 * width / 8)
    assert np.array_equal(unpack_uint(buf, width, 1001, "x"), codes)
    # the bits are the codes' binary digits, MSB first (what a reader of the format expects)
    ref = "".join(format(int(c), f"0{width}b") for c in codes[:16])
    got = "".join(format(int(b), "08b") for b in buf[: (16 * width) // 8])
    assert got == ref[: len(got)]


def test_unpack_uint_rejects_wrong_length_and_padding():
    buf = pack_uint(np.array([1, 2, 3]), 3)  # 9 bits -> 2 bytes, 7 padding bits
    with pytest.raises(PayloadError, match="2 bytes.*take 1|has 2 bytes"):
        unpack_uint(buf, 3, 2, "q")
    with pytest.raises(PayloadError, match="has 3 bytes"):
        unpack_uint(np.concatenate([buf, [0]]).astype(np.uint8), 3, 3, "q")
    bad = buf.copy()
    bad[-1] |= 1
    with pytest.raises(PayloadError, match="padding"):
        unpack_uint(bad, 3, 3, "q")
    with pytest.raises(PayloadError, match="uint8"):
        unpack_uint(buf.astype(np.int16), 3, 3, "q")


@pytest.mark.parametrize("coding", ["auto", "fixed", "elias"])
@pytest.mark.parametrize("k", [0, 1, 5, 300, 999])
def test_index_coding_round_trip_and_size(coding, k):
    rng = np.random.default_rng(k)
    idx = np.sort(rng.choice(D, size=k, replace=False)).astype(np.int64)
    buf = pack_indices(idx, D, coding)
    nbits = index_bits(idx, D, coding)
    assert buf.size == math.ceil(nbits / 8)
    assert np.array_equal(unpack_indices(buf, D, k, coding, "indices"), idx)
    if coding == "auto":  # the shorter of the two, plus the flag bit
        assert nbits == 1 + min(index_bits(idx, D, "fixed"), index_bits(idx, D, "elias"))


def test_auto_index_coding_picks_each_code_where_it_is_shorter():
    sparse = np.array([3, 500, 999])  # gaps 4, 497, 499: 6 + 16 + 16 Elias bits > 3 x 10 fixed bits
    dense = np.arange(0, 200)  # gaps of 1: one bit each, against 10 bits per index
    assert index_bits(dense, D, "auto") == 1 + 200
    assert pack_indices(dense, D, "auto")[0] >> 7 == 1  # flag bit: Elias
    assert index_bits(sparse, D, "auto") == 1 + 30
    assert pack_indices(sparse, D, "auto")[0] >> 7 == 0  # flag bit: fixed


def test_index_stream_rejects_bad_streams():
    idx = np.array([2, 9, 40, 41])
    buf = pack_indices(idx, D, "elias")
    with pytest.raises(PayloadError, match="bits after the last code"):  # an extra byte
        unpack_indices(np.concatenate([buf, [255]]).astype(np.uint8), D, 4, "elias", "indices")
    with pytest.raises(PayloadError, match="truncated|malformed"):  # a byte short
        unpack_indices(buf[:-1], D, 4, "elias", "indices")
    zeros_pad = buf.copy()
    zeros_pad[-1] &= np.uint8(0xFF << (-index_bits(idx, D, "elias") % 8) & 0xFF)
    if index_bits(idx, D, "elias") % 8:
        with pytest.raises(PayloadError, match="padding|bits after"):
            unpack_indices(zeros_pad, D, 4, "elias", "indices")
    past = pack_fields(*elias_omega_codewords(np.array([5, D])))  # the second index is D: past the end
    with pytest.raises(PayloadError, match="outside range|past the end"):
        unpack_indices(pad_ones(*past), D, 2, "elias", "indices")
    fixed = pack_uint(np.array([3, 1001]), 10)  # 1001 fits 10 bits but not range(1000)
    with pytest.raises(PayloadError, match="outside range"):
        unpack_indices(fixed, D, 2, "fixed", "indices")


def test_ones_tail_is_never_a_code():
    """Every Elias omega code word ends in 0, so a tail of < 8 one bits cannot be one."""
    v, n = elias_omega_codewords(np.arange(1, 5000))
    last = (v & np.uint64(1)).astype(np.int64)
    assert not last.any() and n.min() >= 1
    check_ones_tail(np.array([1, 1, 1], dtype=np.uint8), 0, "s")
    with pytest.raises(PayloadError):
        check_ones_tail(np.array([1, 0, 1], dtype=np.uint8), 0, "s")


# ---------------------------------------------------------------- malformed packed payloads
def _tampered(case: str, name: str, edit) -> dict[str, np.ndarray]:
    codec, p = _encoded(case)
    arrays = {k: np.array(a, copy=True) for k, a in codec.wire_arrays(p).items()}
    arrays[name] = edit(arrays[name])
    return codec, arrays


def _set_code(width: int, code: int):
    """Overwrite the first code of a packed array with ``code``."""
    def edit(a):
        bits = np.unpackbits(a)
        bits[:width] = [int(c) for c in format(code, f"0{width}b")]
        return np.packbits(bits)[: a.size]
    return edit


BAD = {
    "sign short": ("sign", "signs", lambda a: a[:-1], "bytes"),
    "sign long": ("sign", "signs", lambda a: np.concatenate([a, [0]]).astype(np.uint8), "bytes"),
    "terngrad code 3": ("terngrad", "q", _set_code(2, 3), "code 3 outside 0..2"),
    "qcs code 7": ("qcs", "q", _set_code(3, 7), "code 7 outside 0..4"),
    "qsgd fixed code 15": ("qsgd_fixed", "q", _set_code(4, 15), "code 15 outside 0..8"),
    "onebit short": ("onebit_cs", "q", lambda a: a[:-2], "bytes"),
    "topk short": ("topk_fixed", "indices", lambda a: a[:-1], "bytes"),
    "topk index past d": ("topk_fixed", "indices", _set_code(10, 1010), "outside range"),
    "qsgd stream short": ("qsgd", "stream", lambda a: a[:5], "shorter than its norms"),
    "qsgd stream level": ("qsgd", "stream", "level", "level 5 outside 0..4"),
    "qsgd stream position": ("qsgd", "stream", "position", "past the end"),
    "qsgd stream truncated code": ("qsgd", "stream", "truncated", "truncated or malformed"),
    "dataq code": ("dataq", "level", _set_code(4, 15), "code 15 outside 0..14"),
    "float wrong length": ("rlc", "y", lambda a: a[:-1], "shape"),
}


def _qsgd_stream(codec, what: str):
    """A Code_s stream that is well formed but for ``what``: a level of s + 1, a position past d, or a last
    code word cut short (its final 0 missing, then zero padding)."""
    norms = np.ones(codec.seg.count, dtype=np.float32).view(np.uint32).astype(np.uint64)
    gap, level = {"level": (3, codec.levels + 1), "position": (D + 1, 1), "truncated": (3, 1)}[what]
    gv, gl = elias_omega_codewords(np.array([gap]))
    lv, ll = elias_omega_codewords(np.array([level]))
    values = np.concatenate([norms, gv, [0], lv]).astype(np.uint64)
    lengths = np.concatenate([np.full(norms.size, 32), gl, [1], ll]).astype(np.int64)
    if what == "truncated":  # a gap code 1 11 1111 1..: groups of 2, 4, then 16 bits, of which only 2 are left
        values = np.concatenate([norms, [0b11111110]]).astype(np.uint64)
        lengths = np.concatenate([np.full(norms.size, 32), [8]]).astype(np.int64)
        return pack_fields(values, lengths)[0]
    return pad_ones(*pack_fields(values, lengths))


@pytest.mark.parametrize("what", sorted(BAD))
def test_malformed_packed_arrays_are_rejected(what):
    case, name, edit, message = BAD[what]
    codec, arrays = _tampered(case, name, edit if callable(edit) else (lambda a: a))
    if isinstance(edit, str):
        arrays[name] = _qsgd_stream(codec, edit)
    with pytest.raises(PayloadError, match=message):
        codec.from_wire(arrays)


def test_wrong_array_names_are_rejected():
    codec, p = _encoded("sign")
    arrays = codec.wire_arrays(p)
    arrays["extra"] = np.zeros(1, np.uint8)
    with pytest.raises(PayloadError, match="expected"):
        codec.from_wire(arrays)
    codec, p = _encoded("qsgd")
    with pytest.raises(PayloadError, match="expected \\['stream'\\]"):
        codec.from_wire({"q": np.zeros(3, np.uint8)})


# ---------------------------------------------------------------- the server's per-reply checks
def _round(codec: dict):
    raw = {
        "rounds": 1, "clients": 4, "clients_per_round": 4, "seed": 3,
        "data": {"name": "synthetic", "partition": "natural"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"lr": 0.05, "batch_size": 16},
        "strategy": {"name": "compressed"},
        "codec": codec,
    }
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    exp = build_experiment(cfg)
    s = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), cfg.clients)
    msgs = list(s.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    return s, list(grid.send_and_receive(msgs))


@pytest.mark.parametrize("codec,name,bad,message", [
    ({"name": "sign"}, "signs", lambda a: a[:-1], "bytes"),
    ({"name": "terngrad"}, "q", _set_code(2, 3), "outside"),
    ({"name": "qsgd", "levels": 4}, "stream", lambda a: a[:3], "shorter than its norms"),
    ({"name": "topk", "k": 30}, "indices", lambda a: a[:-1], "indices"),
])
def test_server_rejects_a_malformed_packed_reply(codec, name, bad, message):
    s, replies = _round(codec)
    good = [s.read_reply(1, r) for r in replies[1:]]
    counted = sum(r.uplink_bits for r in good)
    assert counted == sum(8 * sum(read_array(a).nbytes for a in r.content[keys.ARRAYS].values()) for r in replies[1:])
    arrays = replies[0].content[keys.ARRAYS]
    arrays[name] = Array(np.ascontiguousarray(bad(read_array(arrays[name], name))))
    with pytest.raises(ReplyError, match=message):
        s.read_reply(1, replies[0])


def test_payload_from_records_needs_the_servers_codec():
    codec, p = _encoded("sign")
    arrays, meta = payload_to_records(p, codec)
    with pytest.raises(PayloadError, match="server expects"):
        payload_from_records(arrays, meta, _codec("terngrad"))

