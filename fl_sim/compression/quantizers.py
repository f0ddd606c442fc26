"""Quantizer and sparsifier kernels: tensors in, tensors out, randomness from a ``torch.Generator``.

Papers (keys of docs/references.md; formulas and errata in docs/notes.md):
  * [Abdi-thesis] Ch. 4 eqs. (4.4)-(4.7) and App. A (Thm 18, Remark 11): subtractive dithered
    uniform quantization (docs/notes.md#qcs), with the ERRATUM of the 1-bit case (docs/notes.md#qcs-1bit-erratum):
    as printed, ``v_hat = rho (q - u)`` with ``rho = 2 ||v||_inf`` has ``E[v_hat] = 2 v``; the unbiased form is
    ``v_hat = rho (q/2 - u)``.
  * QSGD ([Alistarh-2017], Lemma 3.1), the thesis's ref. [15] (docs/notes.md#qsgd-as-dither, App. A Lemma 19).
  * TernGrad ([Wen-2017]); scaled sign ([Karimireddy-2019], "Error feedback fixes SignSGD").
  * Top-k / random-k sparsification ([Stich-2018]; [Wangni-2018], thesis ref. [25]).

Conventions: every kernel works along the last dimension and is batched over leading dimensions.
Scales are computed in float64 from a unit-max copy of the input, so tiny (subnormal) or huge
(~1e38) magnitudes never produce NaN; a scale that does not fit the float32 that is sent raises
:class:`CodecError`. Bit counts here are for fixed-length codes, exact integers; QSGD's Elias code and
Elias-coded top-k indices are in :mod:`fl_sim.compression.coding`.

Scale granularity: the QSGD, TernGrad and scaled-sign kernels take an optional
:class:`~fl_sim.compression.segments.Segments` and compute one scale per segment (a model tensor or a
bucket) with segment reductions; without it, one scale per row as before.
"""

from __future__ import annotations

import math

import torch

from fl_sim.compression.base import CodecError, bits_for_index
from fl_sim.compression.segments import Segments

__all__ = [
    "FLOAT_BITS",
    "check_levels",
    "level_bits",
    "level_dtype",
    "unit_max",
    "to_wire_float",
    "uniform_dither",
    "dithered_quantize",
    "dithered_dequantize",
    "dithered_bits",
    "qsgd_quantize",
    "qsgd_dequantize",
    "qsgd_bits",
    "qsgd_variance_bound",
    "terngrad_quantize",
    "terngrad_dequantize",
    "terngrad_bits",
    "scaled_sign",
    "scaled_sign_decode",
    "sign_bits",
    "segment_unit_max",
    "sigma_clip",
    "split_k",
    "topk_segments",
    "topk_rows",
    "topk_sparsify",
    "randk_indices",
    "scatter_dense",
    "topk_bits",
    "randk_bits",
]

FLOAT_BITS = 32  # one float32 scalar on the wire (norm, scale, value)
_F32_MAX = float(torch.finfo(torch.float32).max)


# -- shared helpers -------------------------------------------------------------------------------
def check_levels(levels: object, who: str) -> float:
    """Q of the dithered quantizer: a positive int (levels {-Q..Q}) or exactly 0.5 (the 1-bit variant)."""
    if isinstance(levels, bool) or not isinstance(levels, (int, float)):
        raise CodecError(f"{who}: levels must be a positive int or 0.5 (1-bit), got {levels!r}")
    if levels == 0.5:
        return 0.5
    if levels != int(levels) or levels < 1 or levels > 2**20:
        raise CodecError(f"{who}: levels must be an int in 1..2^20 or 0.5 for the 1-bit variant, got {levels!r}")
    return float(int(levels))


def level_bits(levels: float) -> int:
    """Bits of one level index: ceil(log2(2Q+1)) for integer Q (fixed-length code), 1 for Q = 1/2.

    The thesis counts k log2(2Q+1) (an entropy/packed bound, eq. 4.11); we count the fixed-length code.
    """
    return 1 if levels == 0.5 else math.ceil(math.log2(2 * int(levels) + 1))


def level_dtype(max_abs: int) -> torch.dtype:
    """Smallest signed integer dtype that holds levels in {-max_abs..max_abs}."""
    if max_abs <= 127:
        return torch.int8
    if max_abs <= 32767:
        return torch.int16
    return torch.int32


def unit_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / s, s) with s = ||x||_inf along the last dim (float64, shape (...,)); rows of zeros keep s = 0.

    x / s lies in [-1, 1] even for subnormal or near-overflow inputs, so the math after it is safe.
    """
    s = x.abs().amax(dim=-1)  # an element of x, so exact in x's dtype
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return x / safe.unsqueeze(-1), s.to(torch.float64)


def to_wire_float(t: torch.Tensor, who: str, what: str) -> torch.Tensor:
    """Cast to the float32 that is sent; values beyond float32 range raise a one-line CodecError."""
    if t.numel() and float(t.abs().max()) > _F32_MAX:
        raise CodecError(
            f"{who}: {what} exceeds the float32 range ({float(t.abs().max()):.3g} > 3.4e38); scale the update down"
        )
    return t.to(torch.float32)


# -- dithered uniform quantizer ([Abdi-thesis] eqs. 4.4-4.7) ---------------------------------------------------
def uniform_dither(shape: tuple[int, ...], *, generator: torch.Generator) -> torch.Tensor:
    """u ~ U(-1/2, 1/2) i.i.d., float32, shape ``shape`` (shared randomness, rebuilt from the seed)."""
    return torch.rand(shape, generator=generator, dtype=torch.float32).sub_(0.5)


def dithered_quantize(v: torch.Tensor, levels: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dithered quantization of each row of v (..., k) with dither u (..., k).

    Q >= 1 (eq. 4.4):   rho = ||v||_inf / Q,  q = round(v/rho + u) in {-Q..Q}
    Q = 1/2 (eq. 4.5):  rho = 2 ||v||_inf,    q = sign(v/rho + u) in {-1, +1}  (sign(0) = -1 as printed)

    Returns (q, s): q signed int levels (..., k); s = ||v||_inf float64 (...,), from which rho = s / Q.
    A zero row gives s = 0 and decodes to zeros. The clamp to {-Q..Q} only acts on the measure-zero
    event v/rho + u = -(Q + 1/2) (round-half-to-even).
    """
    s = v.abs().amax(dim=-1)  # ||v||_inf, an element of v (exact in v's dtype)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if levels == 0.5:  # v/rho = v / (2 ||v||_inf)
        r = (v / safe.unsqueeze(-1)).to(torch.float32).mul_(0.5).add_(u)
        q = torch.where(r > 0, 1, -1).to(torch.int8)
    else:  # v/rho = Q v / ||v||_inf, in [-Q, Q]; |v| <= ||v||_inf keeps it finite for any magnitude
        qi = int(levels)
        r = (v / safe.unsqueeze(-1)).to(torch.float32).mul_(qi).add_(u)
        q = r.round_().clamp_(-qi, qi).to(level_dtype(qi))
    return q, s.to(torch.float64)


def dithered_dequantize(q: torch.Tensor, s: torch.Tensor, levels: float, u: torch.Tensor) -> torch.Tensor:
    """v_hat = rho (q - u) (eq. 4.6) for Q >= 1, v_hat = rho (q/2 - u) for Q = 1/2 (docs/notes.md#qcs-1bit-erratum).

    rho = s / Q. Error v_hat - v ~ U(-rho/2, rho/2), independent of v (eq. 4.7, Thm 18): variance rho^2/12.
    Returns float32 (..., k), computed in float64 (a value beyond float32 range becomes inf, never NaN;
    codecs reject it with :func:`to_wire_float`).
    """
    code = q.to(torch.float32) * (0.5 if levels == 0.5 else 1.0) - u
    rho = (s / levels).unsqueeze(-1)  # float64: rho = 2 ||v||_inf may exceed float32 even if v does not
    return (code.to(torch.float64) * rho).to(torch.float32)


def dithered_bits(blocks: int, k: int, levels: float) -> int:
    """Bits of blockwise dithered quantization: one float32 scale per block + k fixed-length levels per block."""
    return blocks * (FLOAT_BITS + k * level_bits(levels))


# -- segment helpers (scale granularity, fl_sim.compression.segments) ---------------------------------------
def _seg(x: torch.Tensor, seg: Segments | None) -> Segments:
    return seg if seg is not None else Segments.whole(x.shape[-1])


def _out(v: torch.Tensor, seg: Segments | None) -> torch.Tensor:
    """Per-segment scales (..., T); without ``seg`` the old shape (...,) of one scale per row."""
    return v.squeeze(-1) if seg is None else v


def _scales(v: torch.Tensor, seg: Segments | None) -> torch.Tensor:
    """(..., T) scales from what a caller passes: (...,) without ``seg``, (..., T) with it."""
    return v.unsqueeze(-1) if seg is None else v


def segment_unit_max(x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / m, m) with m = max |x| over each segment ((..., T), float64, exact); zero segments keep m = 0.

    x / m lies in [-1, 1] for any magnitude (subnormal to ~1e38), as :func:`unit_max` per segment.
    """
    m = seg.amax(x.abs())
    safe = torch.where(m > 0, m, torch.ones_like(m))
    return x / seg.expand(safe), m.to(torch.float64)


# -- QSGD (Alistarh et al.) ------------------------------------------------------------------------------
def qsgd_quantize(
    x: torch.Tensor, levels: int, *, generator: torch.Generator | None = None, seg: Segments | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QSGD with s = ``levels``: per coordinate, l = floor(s |x_i|/||x||_2) + Bernoulli(frac), q = sign(x_i) l.

    ||x||_2 is taken over each segment of ``seg`` (one tensor or bucket; the whole row without it).
    The Bernoulli draws compare U(0, 1) float32 numbers with frac: ``torch.rand(x.shape, generator=generator)``,
    or ``uniform`` (x's shape) when given (a block of clients, each row drawn from its client's generator).
    Returns (norm, q): norm float64 (...,) without ``seg``, (..., T) with it; q in {-s..s} (..., d).
    Unbiased: E[norm * q / s] = x; per segment E||Q(x) - x||^2 <= min(n/s^2, sqrt(n)/s) ||x||^2 (Lemma 3.1).
    """
    sg = _seg(x, seg)
    t, s_inf = segment_unit_max(x, sg)
    t = t.to(torch.float32)
    unit_norm = sg.sum(t.to(torch.float64) ** 2).sqrt()  # ||x||_2 / ||x||_inf per segment, in [1, sqrt(n)]
    norm = s_inf * unit_norm
    safe = torch.where(unit_norm > 0, unit_norm, torch.ones_like(unit_norm)).to(torch.float32)
    r = t.abs() / sg.expand(safe) * levels  # in [0, s]
    low = torch.floor(r)
    if uniform is None:
        uniform = torch.rand(r.shape, generator=generator, dtype=torch.float32)
    up = uniform < (r - low)
    lvl = (low + up.to(torch.float32)).clamp_(0, levels)
    q = (torch.sign(t) * lvl).to(level_dtype(levels))
    return _out(norm, seg), q


def qsgd_dequantize(norm: torch.Tensor, q: torch.Tensor, levels: int, seg: Segments | None = None) -> torch.Tensor:
    """x_hat = ||x||_2 * q / s per segment, float32."""
    scale = (_scales(norm, seg) / levels).to(torch.float32)
    return q.to(torch.float32) * _seg(q, seg).expand(scale)


def qsgd_bits(d: int, levels: int, scales: int = 1) -> int:
    """Fixed-length code: 32 per norm (one per segment) + d (1 sign bit + ceil(log2(s+1)) level bits).

    QSGD's own code (Elias, Section 3.2) is :func:`fl_sim.compression.coding.qsgd_stream_bits`.
    """
    return FLOAT_BITS * scales + d * (1 + bits_for_index(levels + 1))


def qsgd_variance_bound(d: int, levels: int) -> float:
    """QSGD Lemma 3.1: E||Q(x) - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2."""
    return min(d / levels**2, math.sqrt(d) / levels)


# -- TernGrad (Wen et al.) ---------------------------------------------------------------------------------
def sigma_clip(x: torch.Tensor, c: float, seg: Segments | None = None) -> torch.Tensor:
    """TernGrad's gradient clipping ([Wen-2017], Section 3.3): x_i clipped to [-c sigma, c sigma],
    sigma the standard deviation of the elements of each segment (population std about the mean, as the
    authors' ``clip_gradients_by_stddev`` and GRACE). Computed in float64 from a unit-max copy.
    Departure: a segment with sigma = 0 (constant, or one element) is not clipped; the paper's rule would
    clip it to 0 (the authors' code sends tensors below ``size_to_binarize`` unquantized instead)."""
    sg = _seg(x, seg)
    t, m = segment_unit_max(x, sg)
    t = t.to(torch.float64)
    n = sg.lengths.to(torch.float64)
    mean = sg.sum(t) / n
    sigma = (sg.sum((t - sg.expand(mean)) ** 2) / n).sqrt() * m  # back to x's scale
    # sigma = 0 (a constant or one-element tensor): the clip would zero the whole tensor; leave it as is
    bound = sg.expand(torch.where(sigma > 0, c * sigma, torch.full_like(sigma, math.inf)))
    return torch.minimum(torch.maximum(x.to(torch.float64), -bound), bound).to(x.dtype)


def terngrad_quantize(
    x: torch.Tensor, *, generator: torch.Generator | None = None, seg: Segments | None = None,
    clip_sigma: float | None = None, uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TernGrad: s = max|x| per segment (layer), b_i ~ Bernoulli(|x_i|/s), q_i = sign(x_i) b_i in {-1, 0, 1}.

    With ``clip_sigma`` = c, x is first clipped to [-c sigma, c sigma] per segment (:func:`sigma_clip`;
    the paper uses c = 2.5). Returns (s float64, (...,) without ``seg`` or (..., T) with it; q int8
    (..., d)). Unbiased for the (clipped) input: E[s q] = x; E||s q - x||^2 = sum_i (s|x_i| - x_i^2).
    ``uniform``: the U(0, 1) float32 draws (x's shape) instead of drawing them from ``generator``.
    """
    if clip_sigma is not None:
        x = sigma_clip(x, clip_sigma, seg)
    t, s = segment_unit_max(x, _seg(x, seg))
    t = t.to(torch.float32)
    if uniform is None:
        uniform = torch.rand(t.shape, generator=generator, dtype=torch.float32)
    b = uniform < t.abs()
    return _out(s, seg), (torch.sign(t) * b.to(torch.float32)).to(torch.int8)


def terngrad_dequantize(s: torch.Tensor, q: torch.Tensor, seg: Segments | None = None) -> torch.Tensor:
    """x_hat = s q per segment, float32."""
    return q.to(torch.float32) * _seg(q, seg).expand(_scales(s, seg).to(torch.float32))


def terngrad_bits(d: int, scales: int = 1) -> int:
    """32 per scale (one per layer) + 2 bits per ternary coordinate (the authors' encoder packs 4 per byte)."""
    return FLOAT_BITS * scales + 2 * d


# -- scaled sign (Karimireddy et al.) --------------------------------------------------------------------
def scaled_sign(x: torch.Tensor, seg: Segments | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """C(x) = (||x||_1 / n) sign(x) per segment of n coordinates, with sign(0) = +1 (one bit per coordinate).

    Returns (scale float64, (...,) without ``seg`` or (..., T) with it; signs int8 in {-1, +1} (..., d)).
    Biased; used with error feedback.
    """
    sg = _seg(x, seg)
    t, s_inf = segment_unit_max(x, sg)
    scale = s_inf * sg.sum(t.to(torch.float64).abs()) / sg.lengths.to(torch.float64)
    signs = torch.where(x < 0, -1, 1).to(torch.int8)
    return _out(scale, seg), signs


def scaled_sign_decode(scale: torch.Tensor, signs: torch.Tensor, seg: Segments | None = None) -> torch.Tensor:
    """x_hat = scale * signs per segment, float32."""
    return signs.to(torch.float32) * _seg(signs, seg).expand(_scales(scale, seg).to(torch.float32))


def sign_bits(d: int, scales: int = 1) -> int:
    """32 per scale (one per segment) + 1 bit per coordinate."""
    return FLOAT_BITS * scales + d


# -- sparsifiers ------------------------------------------------------------------------------------------
def topk_sparsify(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-magnitude coordinates of a 1-D x: (indices int64 sorted ascending, values)."""
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return idx, x[idx]


def split_k(k: int, lengths: torch.Tensor) -> torch.Tensor:
    """k apportioned to segments in proportion to their sizes, summing to exactly k (largest remainder).

    k_t = floor(k n_t / d), plus one for the (k - sum) segments with the largest remainders k n_t mod d
    (ties: the earlier segment). k_t <= n_t always. GRACE instead takes max(1, floor(ratio n_t)) per tensor,
    whose total is not k; the exact total keeps the payload shape fixed and the bits equal to vector top-k.
    """
    n = lengths.to(torch.int64)
    d = int(n.sum())
    base, rem = (k * n) // d, (k * n) % d
    extra = k - int(base.sum())
    order = torch.sort(-rem, stable=True).indices[:extra]
    base[order] += 1
    return base


def topk_rows(x: torch.Tensor, ks: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_segments` of every row of a block x (C, d): (indices (C, k) sorted ascending, values (C, k)).

    The same selection per row (``torch.topk`` of each row, or the same sort keys sorted along the rows),
    so each row's result is that of ``topk_segments(x[i], ks, seg)``, ties included.
    """
    if seg.count == 1:
        idx = torch.topk(x.abs(), int(ks[0]), dim=-1, sorted=False).indices.sort(dim=-1).values
        return idx, x.gather(-1, idx)
    return _topk_by_segment(x, ks, seg)


def topk_segments(x: torch.Tensor, ks: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k_t of each segment of a 1-D x: (global indices sorted ascending, values).

    One sort puts each segment's coordinates in descending magnitude: for float32 x the int64 key
    segment << 32 | (2^31 - 1 - bits(|x_i|)) (the bit pattern of a non-negative float32 is monotonic in
    its value); float64 x takes two stable sorts (by |x| descending, then by segment). The rank inside
    the segment picks the first k_t. O(d log d), no loop over tensors.
    """
    if seg.count == 1:
        return topk_sparsify(x, int(ks[0]))
    return _topk_by_segment(x, ks, seg)


def _topk_by_segment(x: torch.Tensor, ks: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort-based selection of :func:`topk_segments` along the last dim of x, (d,) or a block (C, d):
    the same torch calls for a lone vector and for each row of a block."""
    if x.dtype == torch.float32:
        key = (seg.ids << 32) | ((2**31 - 1) - x.abs().view(torch.int32).to(torch.int64))
        order = torch.sort(key, dim=-1, stable=True).indices
    else:
        order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
        order = order.gather(-1, torch.sort(seg.ids[order], dim=-1, stable=True).indices)
    owner = seg.ids[order]
    rank = torch.arange(seg.dim) - seg.starts[owner]
    idx = order[rank < ks[owner]]  # k_t per segment, so k per row
    if x.dim() == 2:
        idx = idx.view(x.shape[0], -1)
    idx = idx.sort(dim=-1).values
    return idx, x.gather(-1, idx)


def randk_indices(d: int, k: int, *, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices of range(d), a uniform k-subset, sorted (shared randomness, never sent).

    For k <= d/4: draw k + k/8 + 32 indices with replacement, keep the distinct ones, pick k of those at
    random (redraw in the rare case of fewer than k): O(k log k) instead of a permutation of all d. The
    law of the result is invariant under relabelling range(d), hence uniform over k-subsets.
    """
    if 4 * k > d:
        return torch.randperm(d, generator=generator)[:k].sort().values
    while True:
        draw = torch.randint(0, d, (k + k // 8 + 32,), generator=generator).unique()
        if draw.numel() >= k:
            return draw[torch.randperm(draw.numel(), generator=generator)[:k]].sort().values


def scatter_dense(idx: torch.Tensor, values: torch.Tensor, d: int) -> torch.Tensor:
    """A float32 (d,) vector with ``values`` at ``idx`` and zeros elsewhere."""
    out = torch.zeros(d, dtype=torch.float32)
    out[idx] = values.to(torch.float32)
    return out


def topk_bits(d: int, k: int) -> int:
    """k float32 values + k indices of ceil(log2 d) bits each (fixed-length index code)."""
    return k * (FLOAT_BITS + bits_for_index(d))


def randk_bits(k: int) -> int:
    """k float32 values; indices come from the shared seed."""
    return k * FLOAT_BITS
