"""DataQ and GradCorrQ: quantizing data samples instead of gradients (DaQuSGD, Hanna et al.).

Source: [Hanna-DaQuSGD], Algorithm 2 (DataQ, eqs. 6-7, Theorem 1), Algorithm 3
(GradCorrQ, eqs. 8-10) and §VI (practical variant: batch scaled by max_i ||Z_i||_inf, 3+ bits per
feature, no GradCorrQ); docs/notes.md#dataq-size (exact |S| = C(2d + (m-1)^2, 2d), hockey-stick identity).

Shapes: samples are rows, Z is (N, d) (or (d,) for one sample); levels are integer tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fl_sim.compression.base import CodecError

__all__ = [
    "dataq_quantize",
    "dataq_dequantize",
    "dataq_set_size",
    "dataq_bits",
    "gradcorrq",
    "gradcorrq_reconstruct",
    "gradcorrq_bound",
    "quantize_batch",
    "dequantize_batch",
    "batch_bits",
    "per_feature_levels",
    "norm_tolerance",
    "gradcorrq_bits",
    "gradcorrq_values",
    "quantize_normalized",
    "dequantize_normalized",
    "dequantize_selection",
]

_EXACT_COMB_LIMIT = 4096  # exact big-integer binomials when the smaller argument is at most this


def _check_m(m: object, who: str) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise CodecError(f"{who}: m (number of levels on [0, B]) must be an int >= 2, got {m!r}")
    return m


def _check_bound(bound: object, who: str) -> float:
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
        raise CodecError(f"{who}: B must be a positive finite number, got {bound!r}")
    return float(bound)


def _check_data(z: object, who: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise CodecError(f"{who}: expected a torch.Tensor, got {type(z).__name__}")
    if z.dim() not in (1, 2):
        raise CodecError(f"{who}: expected samples of shape (N, d) or (d,), got {tuple(z.shape)}")
    if not torch.is_floating_point(z):
        raise CodecError(f"{who}: expected floating-point data, got {z.dtype}")
    if not torch.isfinite(z).all():
        raise CodecError(f"{who}: data contains NaN or inf")
    return z if z.dtype == torch.float64 else z.to(torch.float32)


def norm_tolerance(m: int) -> float:
    """Relative slack allowed on ||Z||_2 <= B (float32 rounding of normalised data).

    With ||Z||_2 <= B (1 + tol), sum_j a_j^2 <= (m-1)^2 (1 + tol)^2 < (m-1)^2 + 1, so the integer sum
    still obeys ||a||_1 + ||b||_1 <= (m-1)^2: tol = min(1e-6, 1/(4 (m-1)^2)) keeps Theorem 1 (i) exact.
    """
    return min(1e-6, 0.25 / (m - 1) ** 2)


def _split_floor(z: torch.Tensor, steps: int, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a = floor(steps Z+/B), b = floor(steps Z-/B) as int64 (Alg. 2 with steps = m - 1)."""
    t = z.to(torch.float64) * (steps / bound)
    a = torch.floor(t.clamp(min=0.0)).to(torch.int64)
    b = torch.floor((-t).clamp(min=0.0)).to(torch.int64)
    return a, b


def dataq_quantize(z: torch.Tensor, m: int, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2 (DataQ) on each sample Z (rows of (N, d) or one (d,)) with ||Z||_2 <= B.

        Z+ = max(Z, 0), Z- = max(-Z, 0),  a = floor((m-1) Z+ / B),  b = floor((m-1) Z- / B)

    Returns (a, b), int64, same shape as Z. Theorem 1: (a, b) in S = {(w, v) in N^d x N^d :
    ||w||_1 + ||v||_1 <= (m-1)^2} and ||Z - Z_Q||_inf <= B/(m-1). A sample with ||Z||_2 > B (beyond
    float rounding) raises CodecError: scale the data (Remark 1: send ||Z|| and quantize Z/||Z|| with B = 1).
    """
    z = _check_data(z, "dataq_quantize")
    m, bound = _check_m(m, "dataq_quantize"), _check_bound(bound, "dataq_quantize")
    norms = torch.linalg.vector_norm(z.to(torch.float64), dim=-1)
    if norms.numel() and float(norms.max()) > bound * (1 + norm_tolerance(m)):
        raise CodecError(
            f"dataq_quantize: a sample has ||Z||_2 = {float(norms.max()):.6g} > B = {bound:.6g}; "
            "raise B or normalise the samples (Remark 1)"
        )
    return _split_floor(z, m - 1, bound)


def dataq_dequantize(a: torch.Tensor, b: torch.Tensor, m: int, bound: float) -> torch.Tensor:
    """Z_Q = (a - b) B / (m - 1), float32 (levels q_i = i B/(m-1), eq. 6)."""
    m, bound = _check_m(m, "dataq_dequantize"), _check_bound(bound, "dataq_dequantize")
    if a.shape != b.shape:
        raise CodecError(f"dataq_dequantize: a and b shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return ((a - b).to(torch.float64) * (bound / (m - 1))).to(torch.float32)


def dataq_set_size(d: int, m: int) -> int:
    """|S| for eq. (7) exactly: sum_{q=0}^{(m-1)^2} C(2d + q - 1, q) = C(2d + (m-1)^2, 2d) (hockey-stick)."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise CodecError(f"dataq_set_size: d must be a positive int, got {d!r}")
    m = _check_m(m, "dataq_set_size")
    return math.comb(2 * d + (m - 1) ** 2, 2 * d)


def _log2_comb(n: int, k: int) -> float:
    """log2 C(n, k) as a sum of k terms log2(1 + (n - k)/i), i = 1..k, added with fsum (abs. error ~1e-9)."""
    k = min(k, n - k)
    i = np.arange(1, k + 1, dtype=np.float64)
    return math.fsum(np.log1p((n - k) / i).tolist()) / math.log(2)


def dataq_bits(d: int, m: int) -> int:
    """ceil(log2 |S|), the bits of one DataQ index (Algorithm 2), exactly.

    Exact big-integer arithmetic when min(2d, (m-1)^2) <= 4096; otherwise log2 C(n, k) as a sum of
    k well-conditioned logarithms, with the exact binomial as a fallback when the result is within 1e-6
    of an integer (where rounding could decide the ceiling).
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise CodecError(f"dataq_bits: d must be a positive int, got {d!r}")
    m = _check_m(m, "dataq_bits")
    n, k = 2 * d + (m - 1) ** 2, 2 * d
    if min(k, n - k) <= _EXACT_COMB_LIMIT:
        return (math.comb(n, k) - 1).bit_length()
    approx = _log2_comb(n, k)
    if abs(approx - round(approx)) < 1e-6:
        return (math.comb(n, k) - 1).bit_length()
    return math.ceil(approx)


# -- GradCorrQ (Algorithm 3) ------------------------------------------------------------------------------
def gradcorrq_bound(m: int, bound: float, c_z: float, d: int) -> float:
    """Eq. (8): ||g_Z - g_{Z_Q}|| <= C_z B sqrt(d) / (m - 1)."""
    return c_z * bound * math.sqrt(d) / (_check_m(m, "gradcorrq") - 1)


def gradcorrq_bits(picked: torch.Tensor, bound: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Eq. (9) for a batch: e_g ~ Bernoulli(p), p = Delta_{i*} / (2 bound) + 1/2, clamped to [0, 1].

    picked: (N,) the chosen coordinates Delta_{i*} of N samples; bound: (N,) (or scalar) eq. (8)'s
    C_z B sqrt(d)/(m-1) of each sample (> 0; a zero bound gives p = 1/2 and a zero reconstruction).
    Returns (bits int8 (N,), clipped): ``clipped`` counts samples with |Delta_{i*}| > bound, where the
    clamp makes the estimate biased (eq. (8) rules this out for C_z-Lipschitz gradients).
    """
    picked = picked.to(torch.float64)
    bnd = torch.as_tensor(bound, dtype=torch.float64).expand_as(picked)
    safe = torch.where(bnd > 0, bnd, torch.ones_like(bnd))
    p = torch.where(bnd > 0, picked / (2.0 * safe) + 0.5, torch.full_like(picked, 0.5)).clamp(0.0, 1.0)
    bit = (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).to(torch.int8)
    clipped = int((picked.abs() > bnd).sum())
    return bit, clipped


def gradcorrq_values(bit: torch.Tensor, bound: torch.Tensor, h: int) -> torch.Tensor:
    """Eq. (10) for a batch: the value (2 e_g - 1) h bound placed at each sample's i* (float64 (N,)).

    E[value] = Delta_{i*} (for |Delta_{i*}| <= bound), and with i* uniform on [h] the vector h-scaled
    one-hot is unbiased for Delta (the 1/h of the draw cancels the factor h).
    """
    bnd = torch.as_tensor(bound, dtype=torch.float64).expand(bit.shape)
    return (2.0 * bit.to(torch.float64) - 1.0) * (h * bnd)


def gradcorrq(
    delta: torch.Tensor, m: int, bound: float, c_z: float, d: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3: one random coordinate of the gradient correction Delta = g_Z - g_{Z_Q}, one bit.

        i* ~ U{0..h-1} (shared randomness),  p = Delta_{i*} / (2 C_z B sqrt(d)/(m-1)) + 1/2,
        e_g ~ Bernoulli(p)                                                                    (eq. 9)

    delta: (..., h), batched over leading dims. Returns (i_star int64 (...,), bit int8 (...,)).
    p is clamped to [0, 1]: exact (and unbiased) when |Delta_i| <= C_z B sqrt(d)/(m-1) as eq. (8)
    guarantees for C_z-Lipschitz gradients; a Delta beyond that bound is clipped (biased).
    """
    if not isinstance(delta, torch.Tensor) or not torch.is_floating_point(delta) or delta.dim() < 1:
        raise CodecError("gradcorrq: delta must be a floating tensor of shape (..., h)")
    if not torch.isfinite(delta).all():
        raise CodecError("gradcorrq: delta contains NaN or inf")
    bound = _check_bound(bound, "gradcorrq")
    if not c_z > 0:
        raise CodecError(f"gradcorrq: C_z must be > 0, got {c_z!r}")
    h = delta.shape[-1]
    i_star = torch.randint(0, h, delta.shape[:-1], generator=generator)
    picked = delta.gather(-1, i_star.unsqueeze(-1)).squeeze(-1).to(torch.float64)
    p = (picked / (2.0 * gradcorrq_bound(m, bound, c_z, d)) + 0.5).clamp(0.0, 1.0)
    bit = (torch.rand(p.shape, generator=generator, dtype=torch.float64) < p).to(torch.int8)
    return i_star, bit


def gradcorrq_reconstruct(
    i_star: torch.Tensor, bit: torch.Tensor, h: int, m: int, bound: float, c_z: float, d: int
) -> torch.Tensor:
    """Eq. (10): Delta_hat_{i*} = (2 e_g - 1) C_z B h sqrt(d)/(m-1), zero elsewhere; (..., h) float32.

    Unbiased: E[Delta_hat] = Delta (the 1/h of the uniform i* cancels the factor h).
    """
    amp = h * gradcorrq_bound(m, bound, c_z, d)
    out = torch.zeros(*i_star.shape, h, dtype=torch.float32)
    vals = ((2 * bit.to(torch.float64) - 1) * amp).to(torch.float32)
    return out.scatter_(-1, i_star.unsqueeze(-1), vals.unsqueeze(-1))


# -- practical per-feature variant (§VI) ----------------------------------------------------------------
def per_feature_levels(bits_per_feature: int) -> int:
    """m of the per-feature code: 2^(b-1) levels on [0, S] per sign, so a - b in {-(m-1)..m-1}.

    Those 2^b - 1 values fit a fixed-length b-bit code (sign + b-1 magnitude bits).
    """
    if isinstance(bits_per_feature, bool) or not isinstance(bits_per_feature, int) or not 2 <= bits_per_feature <= 16:
        raise CodecError(
            f"bits per feature must be an int in 2..16 (1 bit leaves only the zero level), got {bits_per_feature!r}; "
            "the paper uses 3 or more"
        )
    return 1 << (bits_per_feature - 1)


def quantize_batch(z: torch.Tensor, bits_per_feature: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's practical DataQ (§VI): scale the batch by S = max_i ||Z_i||_inf, then per feature

        level = floor((m-1) Z+/S) - floor((m-1) Z-/S)  in {-(m-1)..m-1},  m = 2^(b-1)

    (Alg. 2 with B = S applied coordinate-wise; ||Z - Z_Q||_inf <= S/(m-1)).
    Returns (levels int16 (N, d), S float32 0-d). An empty or all-zero batch gives S = 0, levels 0.
    Bits: :func:`batch_bits` = 32 + N d b.
    """
    z = _check_data(z, "quantize_batch")
    steps = per_feature_levels(bits_per_feature) - 1
    scale = float(z.abs().max()) if z.numel() else 0.0
    if scale > float(torch.finfo(torch.float32).max):
        raise CodecError(f"quantize_batch: max |Z| = {scale:.3g} exceeds float32; rescale the data")
    if scale == 0.0:
        return torch.zeros(z.shape, dtype=torch.int16), torch.tensor(0.0, dtype=torch.float32)
    a, b = _split_floor(z, steps, scale)
    return (a - b).to(torch.int16), torch.tensor(scale, dtype=torch.float32)


def dequantize_batch(levels: torch.Tensor, scale: torch.Tensor | float, bits_per_feature: int) -> torch.Tensor:
    """Z_Q = levels S/(m-1), float32 (m = 2^(b-1))."""
    steps = per_feature_levels(bits_per_feature) - 1
    s = float(scale)
    if not math.isfinite(s) or s < 0:
        raise CodecError(f"dequantize_batch: scale must be finite and >= 0, got {s!r}")
    if levels.numel() and int(levels.abs().max()) > steps:
        raise CodecError(f"dequantize_batch: levels outside {{-{steps}..{steps}}} for {bits_per_feature} bits")
    return (levels.to(torch.float64) * (s / steps)).to(torch.float32)


def batch_bits(n: int, d: int, bits_per_feature: int) -> int:
    """32 (scale S) + N d b; 0 when nothing is sent (N = 0). Label bits are the caller's."""
    per_feature_levels(bits_per_feature)
    return 0 if n == 0 else 32 + n * d * bits_per_feature


# -- Algorithm 2 with Remark 1 (norm sent), and the server's reconstruction of a selection ---------------
def quantize_normalized(z: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remark 1: send r_i = ||Z_i||_2 (float32) and DataQ(Z_i / r_i, m) with B = 1 (Algorithm 2).

    z: (N, d). Returns (a, b, r): a, b int64 (N, d) with (a_i, b_i) in S (Theorem 1 (i)), r float32 (N,).
    A zero sample gives r = 0 and a = b = 0. ||Z_i - Z_Q,i||_inf <= r_i/(m-1) (Theorem 1 (iii)).
    Bits per sample: 32 + dataq_bits(d, m) (the index of (a, b) in S).
    """
    z = _check_data(z, "quantize_normalized")
    m = _check_m(m, "quantize_normalized")
    if z.dim() != 2:
        raise CodecError(f"quantize_normalized: expected samples of shape (N, d), got {tuple(z.shape)}")
    r = torch.linalg.vector_norm(z.to(torch.float64), dim=1).to(torch.float32)
    safe = torch.where(r > 0, r, torch.ones_like(r)).to(torch.float64)
    a, b = _split_floor(z.to(torch.float64) / safe.unsqueeze(1), m - 1, 1.0)
    return a, b, r


def dequantize_normalized(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor, m: int) -> torch.Tensor:
    """Z_Q,i = r_i (a_i - b_i)/(m - 1), float32 (N, d)."""
    m = _check_m(m, "dequantize_normalized")
    return ((a - b).to(torch.float64) * (r.to(torch.float64) / (m - 1)).unsqueeze(1)).to(torch.float32)


def dequantize_selection(levels: torch.Tensor, scale: float, bits_per_feature: int) -> torch.Tensor:
    """Features of a per-feature (§VI) selection back from levels (N, *input_shape) and the batch scale."""
    flat = levels.reshape(levels.shape[0], math.prod(levels.shape[1:]))
    return dequantize_batch(flat, scale, bits_per_feature).reshape(levels.shape).to(torch.float32)
