"""Quantizer and sparsifier kernels: tensors in, tensors out, randomness from a ``torch.Generator``.

Papers (shared/papers; equations as digested in papers/NOTES.md):
  * Abdi thesis (002_*.txt) Ch. 4 eqs. (4.4)-(4.7) and App. A (Thm 18, Remark 11): subtractive dithered
    uniform quantization, NOTES §3.1 and §3.3, with the ERRATUM of the 1-bit case (NOTES §3.3): as printed,
    ``v_hat = rho (q - u)`` with ``rho = 2 ||v||_inf`` has ``E[v_hat] = 2 v``; the unbiased form is
    ``v_hat = rho (q/2 - u)``.
  * QSGD (Alistarh et al. 2017, "QSGD", Lemma 3.1), referenced by the thesis as [15] (NOTES §3.1, §3.3 Lemma 19).
  * TernGrad (Wen et al. 2017); scaled sign (Karimireddy et al. 2019, "Error feedback fixes SignSGD").
  * Top-k / random-k sparsification (Stich et al. 2018; Wangni et al. 2018, thesis ref. [25]).

Conventions: every kernel works along the last dimension and is batched over leading dimensions.
Scales are computed in float64 from a unit-max copy of the input, so tiny (subnormal) or huge
(~1e38) magnitudes never produce NaN; a scale that does not fit the float32 that is sent raises
:class:`CodecError`. Bit counts are for fixed-length codes (no entropy coding), exact integers.
"""

from __future__ import annotations

import math

import torch

from .base import CodecError, bits_for_index

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


# -- dithered uniform quantizer (Abdi eqs. 4.4-4.7) ---------------------------------------------------
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
    """v_hat = rho (q - u) (eq. 4.6) for Q >= 1, v_hat = rho (q/2 - u) for Q = 1/2 (erratum, NOTES §3.3).

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


# -- QSGD (Alistarh et al.) ------------------------------------------------------------------------------
def qsgd_quantize(x: torch.Tensor, levels: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """QSGD with s = ``levels``: per coordinate, l = floor(s |x_i|/||x||_2) + Bernoulli(frac), q = sign(x_i) l.

    Returns (norm, q): norm = ||x||_2 float64 (...,), q in {-s..s} (..., d). Unbiased:
    E[norm * q / s] = x; variance E||Q(x) - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2 (Lemma 3.1).
    """
    t, s_inf = unit_max(x)
    t = t.to(torch.float32)
    unit_norm = torch.linalg.vector_norm(t.to(torch.float64), dim=-1)  # ||x||_2 / ||x||_inf, in [1, sqrt(d)]
    norm = s_inf * unit_norm
    safe = torch.where(unit_norm > 0, unit_norm, torch.ones_like(unit_norm)).to(torch.float32)
    r = t.abs() / safe.unsqueeze(-1) * levels  # in [0, s]
    low = torch.floor(r)
    up = torch.rand(r.shape, generator=generator, dtype=torch.float32) < (r - low)
    lvl = (low + up.to(torch.float32)).clamp_(0, levels)
    q = (torch.sign(t) * lvl).to(level_dtype(levels))
    return norm, q


def qsgd_dequantize(norm: torch.Tensor, q: torch.Tensor, levels: int) -> torch.Tensor:
    """x_hat = ||x||_2 * q / s, float32."""
    return q.to(torch.float32) * (norm / levels).to(torch.float32).unsqueeze(-1)


def qsgd_bits(d: int, levels: int) -> int:
    """32 (norm) + d (1 sign bit + ceil(log2(s+1)) level bits), fixed length (no Elias coding)."""
    return FLOAT_BITS + d * (1 + bits_for_index(levels + 1))


def qsgd_variance_bound(d: int, levels: int) -> float:
    """QSGD Lemma 3.1: E||Q(x) - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2."""
    return min(d / levels**2, math.sqrt(d) / levels)


# -- TernGrad (Wen et al.) ---------------------------------------------------------------------------------
def terngrad_quantize(x: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """TernGrad: s = ||x||_inf, b_i ~ Bernoulli(|x_i|/s), q_i = sign(x_i) b_i in {-1, 0, 1}.

    Returns (s float64 (...,), q int8 (..., d)). Unbiased: E[s q] = x; E||s q - x||^2 = sum_i (s|x_i| - x_i^2).
    """
    t, s = unit_max(x)
    t = t.to(torch.float32)
    b = torch.rand(t.shape, generator=generator, dtype=torch.float32) < t.abs()
    return s, (torch.sign(t) * b.to(torch.float32)).to(torch.int8)


def terngrad_dequantize(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x_hat = s q, float32."""
    return q.to(torch.float32) * s.to(torch.float32).unsqueeze(-1)


def terngrad_bits(d: int) -> int:
    """32 (scale) + 2 bits per ternary coordinate."""
    return FLOAT_BITS + 2 * d


# -- scaled sign (Karimireddy et al.) --------------------------------------------------------------------
def scaled_sign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C(x) = (||x||_1 / d) sign(x), with sign(0) = +1 (one bit per coordinate).

    Returns (scale float64 (...,), signs int8 in {-1, +1} (..., d)). Biased; used with error feedback.
    """
    t, s_inf = unit_max(x)
    d = x.shape[-1]
    scale = s_inf * t.to(torch.float64).abs().sum(dim=-1) / d
    signs = torch.where(x < 0, -1, 1).to(torch.int8)
    return scale, signs


def scaled_sign_decode(scale: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x_hat = scale * signs, float32."""
    return signs.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)


def sign_bits(d: int) -> int:
    """32 (scale) + 1 bit per coordinate."""
    return FLOAT_BITS + d


# -- sparsifiers ------------------------------------------------------------------------------------------
def topk_sparsify(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest-magnitude coordinates of a 1-D x: (indices int64 sorted ascending, values)."""
    idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
    return idx, x[idx]


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
    """k float32 values + k indices of ceil(log2 d) bits each."""
    return k * (FLOAT_BITS + bits_for_index(d))


def randk_bits(k: int) -> int:
    """k float32 values; indices come from the shared seed."""
    return k * FLOAT_BITS
