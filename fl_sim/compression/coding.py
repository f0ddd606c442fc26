"""Integer codes on a real bit stream: Elias omega, QSGD's Code_s, delta-coded sorted indices.

QSGD ([Alistarh-2017]: Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017), Section 3.2
"Efficient Coding of Gradients": Q_s(v) is the tuple (||v||_2, sigma, zeta) of the norm, the signs and
the integer levels zeta_i = s xi_i in {0..s}. Elias(k) is Elias' recursive (omega) code of a positive
integer k: write k in binary, then recursively prepend the binary form of (length - 1) until that
is 1, and end with a 0; |Elias(k)| = log k + log log k + ... + 1 <= (1 + o(1)) log k + 1. Code_s:

  32 bits for ||v||_2; then Elias(position of the first nonzero of zeta), one bit for its sign,
  Elias(zeta_i); then, for each further nonzero, Elias(distance from the previous nonzero), its sign
  bit and Elias(zeta_i).

Theorem 3.2 bounds the length of this code by (3 + (3/2 + o(1)) log(2(s^2 + d)/(s(s + sqrt d)))) s(s + sqrt d) + 32.
Here positions are 1-based (the first gap is index + 1, every later gap the difference of indices),
sign bit 0 = "+", 1 = "-". The stream ends after the last nonzero: like the paper, the receiver knows
the message length from its framing, which is not counted. With one scale per tensor (``granularity:
tensor``) the stream carries the T norms first (32 bits each) and the positions run over the whole
flattened vector; the receiver knows the tensor sizes, so with T = 1 this is exactly Code_s.

Encoding is vectorized (numpy): each code word fits in a uint64 (an Elias code of k < 2^31 has at most
42 bits), so the stream is a list of (value, length) fields packed with ``np.repeat`` and
``np.packbits``. Decoding is inherently sequential (each code's length depends on its content): a
numba kernel (a plain-Python loop where numba is missing).

Codecs count bits with :func:`qsgd_stream_bits` / :func:`gap_stream_bits`, the sum of the same field
lengths the encoder packs (tests check ``len(encode(...)) == bits`` and ``decode(encode(x)) == x``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "bit_length",
    "elias_omega_lengths",
    "elias_omega_codewords",
    "pack_fields",
    "unpack_bits",
    "decode_elias_omega",
    "qsgd_fields",
    "qsgd_stream_bits",
    "qsgd_encode_stream",
    "qsgd_decode_stream",
    "index_gaps",
    "gap_stream_bits",
    "gap_encode_stream",
    "gap_decode_stream",
    "StreamError",
]


class StreamError(ValueError):
    """A bit stream that is not a valid code (truncated, a position past the end, an oversized code)."""


# -- Elias omega ------------------------------------------------------------------------------------------
def bit_length(n: np.ndarray) -> np.ndarray:
    """floor(log2 n) + 1 for positive integers (exact: frexp's exponent, no float rounding issue)."""
    return np.frexp(np.asarray(n, dtype=np.float64))[1].astype(np.int64)


def elias_omega_lengths(n: np.ndarray) -> np.ndarray:
    """|Elias_omega(n)| for each n >= 1: 1 + sum of the bit lengths of n, len(n)-1, ... while > 1."""
    cur = np.asarray(n, dtype=np.int64)
    total = np.ones(cur.shape, dtype=np.int64)
    while True:
        big = cur > 1
        if not big.any():
            return total
        bl = bit_length(np.where(big, cur, 1))
        total += np.where(big, bl, 0)
        cur = np.where(big, bl - 1, 1)


def elias_omega_codewords(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(value uint64, length int64) of Elias_omega(n), n in 1..2^31-1, most significant bit sent first.

    Built from the end: the trailing 0, then binary(n) prepended, then binary(len(n) - 1), ...
    """
    cur = np.asarray(n, dtype=np.int64)
    if cur.size and (cur.min() < 1 or cur.max() >= 2**31):
        raise ValueError("Elias omega: integers must be in 1..2^31-1")
    value = np.zeros(cur.shape, dtype=np.uint64)
    length = np.ones(cur.shape, dtype=np.int64)
    while True:
        big = cur > 1
        if not big.any():
            return value, length
        bl = bit_length(np.where(big, cur, 1))
        value |= np.where(big, cur.astype(np.uint64) << length.astype(np.uint64), np.uint64(0))
        length += np.where(big, bl, 0)
        cur = np.where(big, bl - 1, 1)


def pack_fields(values: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Concatenate fields (value, nbits <= 64), MSB first, into a packed uint8 stream; returns (bytes, nbits)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    nbits = int(lengths.sum())
    if nbits == 0:
        return np.zeros(0, dtype=np.uint8), 0
    owner = np.repeat(np.arange(lengths.size), lengths)
    starts = np.cumsum(lengths) - lengths
    shift = (lengths[owner] - 1 - (np.arange(nbits) - starts[owner])).astype(np.uint64)
    bits = ((np.asarray(values, dtype=np.uint64)[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits), nbits


def unpack_bits(stream: np.ndarray, nbits: int) -> np.ndarray:
    """The first ``nbits`` bits of a packed stream as a uint8 0/1 array."""
    return np.unpackbits(np.asarray(stream, dtype=np.uint8), count=nbits)


# -- sequential decoders (numba; the same code runs as plain Python without it) -----------------------------
try:  # pragma: no cover - exercised implicitly
    from numba import njit as _njit

    _jit = _njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover
    def _jit(f):
        return f


@_jit
def _read_omega(bits, ptr, nbits):  # pragma: no cover - compiled
    """(value, new ptr) of one Elias omega code at ``ptr``; value -1 on a truncated / oversized code."""
    n = 1
    while True:
        if ptr >= nbits:
            return -1, ptr
        if bits[ptr] == 0:
            return n, ptr + 1
        width = n + 1
        if width > 62 or ptr + width > nbits:
            return -1, ptr
        v = 0
        for j in range(width):
            v = (v << 1) | bits[ptr + j]
        ptr += width
        n = v


@_jit
def _read_uint(bits, ptr, width):  # pragma: no cover - compiled
    v = 0
    for j in range(width):
        v = (v << 1) | bits[ptr + j]
    return v


@_jit
def _decode_qsgd(bits, nbits, count, dim, norms, q):  # pragma: no cover - compiled
    """Fill norms (count,) uint32 and q (dim,) int64 from a Code_s stream; returns 0 or an error code."""
    if nbits < 32 * count:
        return 1
    ptr = 0
    for t in range(count):
        norms[t] = _read_uint(bits, ptr, 32)
        ptr += 32
    pos = -1
    while ptr < nbits:
        gap, ptr = _read_omega(bits, ptr, nbits)
        if gap < 0:
            return 2
        pos += gap
        if pos >= dim:
            return 3
        if ptr >= nbits:
            return 2
        neg = bits[ptr]
        ptr += 1
        level, ptr = _read_omega(bits, ptr, nbits)
        if level < 0:
            return 2
        q[pos] = -level if neg == 1 else level
    return 0


@_jit
def _decode_omegas(bits, nbits, count, out):  # pragma: no cover - compiled
    """``count`` consecutive Elias omega codes into out; returns 0, or 2 if the stream is short / malformed."""
    ptr = 0
    for i in range(count):
        v, ptr = _read_omega(bits, ptr, nbits)
        if v < 0:
            return 2
        out[i] = v
    return 0 if ptr == nbits else 4


def decode_elias_omega(stream: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``count`` Elias omega integers from a packed stream of exactly ``nbits`` bits."""
    out = np.zeros(count, dtype=np.int64)
    status = _decode_omegas(unpack_bits(stream, nbits), nbits, count, out)
    if status:
        raise StreamError(f"Elias omega stream: {'truncated or malformed' if status == 2 else 'trailing bits'}")
    return out


# -- QSGD Code_s ----------------------------------------------------------------------------------------------
def index_gaps(idx: np.ndarray) -> np.ndarray:
    """1-based gaps of sorted distinct indices: idx[0] + 1, then idx[j] - idx[j-1] (all >= 1)."""
    idx = np.asarray(idx, dtype=np.int64)
    return np.diff(idx, prepend=-1)


def _as_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def qsgd_fields(norms: torch.Tensor | np.ndarray, q: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (value, length) fields of Code_s: T float32 norms (32 bits each), then per nonzero level
    Elias(gap), sign bit, Elias(|level|)."""
    norm_bits = np.ascontiguousarray(_as_numpy(norms), dtype=np.float32).reshape(-1).view(np.uint32)
    qn = _as_numpy(q).reshape(-1).astype(np.int64)
    nz = np.flatnonzero(qn)
    gv, gl = elias_omega_codewords(index_gaps(nz))
    lv, ll = elias_omega_codewords(np.abs(qn[nz]))
    per = np.stack([gv, (qn[nz] < 0).astype(np.uint64), lv], axis=1).reshape(-1)
    per_len = np.stack([gl, np.ones_like(gl), ll], axis=1).reshape(-1)
    values = np.concatenate([norm_bits.astype(np.uint64), per])
    lengths = np.concatenate([np.full(norm_bits.size, 32, dtype=np.int64), per_len])
    return values, lengths


def qsgd_stream_bits(q: torch.Tensor, count: int) -> int:
    """Exact length of Code_s for levels q (dim,) with ``count`` norms: 32 count + sum over nonzeros of
    |Elias(gap)| + 1 + |Elias(|level|)| (the sum of :func:`qsgd_fields`' lengths, without packing)."""
    qn = _as_numpy(q).reshape(-1)
    nz = np.flatnonzero(qn)
    return int(32 * count + nz.size + elias_omega_lengths(index_gaps(nz)).sum()
               + elias_omega_lengths(np.abs(qn[nz].astype(np.int64))).sum())


def qsgd_encode_stream(norms: torch.Tensor, q: torch.Tensor) -> tuple[np.ndarray, int]:
    """Code_s as a packed uint8 stream and its length in bits."""
    return pack_fields(*qsgd_fields(norms, q))


def qsgd_decode_stream(stream: np.ndarray, nbits: int, count: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms float32 (count,), levels int64 (dim,)) from a Code_s stream; StreamError if malformed."""
    norms = np.zeros(count, dtype=np.uint32)
    q = np.zeros(dim, dtype=np.int64)
    status = _decode_qsgd(unpack_bits(stream, nbits), nbits, count, dim, norms, q)
    if status:
        why = {1: "shorter than its norms", 2: "truncated or malformed code", 3: "a position past the end"}[status]
        raise StreamError(f"QSGD stream: {why}")
    return torch.from_numpy(norms.view(np.float32).copy()), torch.from_numpy(q)


# -- sorted indices as Elias-coded gaps (top-k index coding) --------------------------------------------------
def gap_stream_bits(idx: torch.Tensor) -> int:
    """Bits of k sorted distinct indices sent as Elias omega codes of their 1-based gaps."""
    return int(elias_omega_lengths(index_gaps(_as_numpy(idx))).sum())


def gap_encode_stream(idx: torch.Tensor) -> tuple[np.ndarray, int]:
    return pack_fields(*elias_omega_codewords(index_gaps(_as_numpy(idx))))


def gap_decode_stream(stream: np.ndarray, nbits: int, count: int) -> torch.Tensor:
    """The sorted indices back from their gap stream (the receiver knows k)."""
    return torch.from_numpy(np.cumsum(decode_elias_omega(stream, nbits, count)) - 1)
