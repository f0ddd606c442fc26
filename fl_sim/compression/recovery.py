"""Sparse recovery from linear measurements: FIHT, binary IHT and the l1 linear program.

* :func:`fiht` - Fast Iterative Hard Thresholding (Wei 2014), the decoder of Tang et al.
  (shared/papers/003_0f8b3e65132592f6.txt, slides; NOTES.md §4(a) and the §4 "[ext] gap-fill" for
  the steps, which the slides do not give).
* :func:`biht` - Binary Iterative Hard Thresholding (Jacques, Laska, Boufounos & Baraniuk 2013) for
  1-bit measurements y = sign(Phi x), in its normalized form (Friedlander et al. 2021); used by the
  1-bit QCS codec of Mitra & Khisti (shared/papers/000_2a9201d51a7b29c4.txt, eqs. 4, 9).
* :func:`l1_recovery_lp` - Mitra & Khisti eq. (3) (equality constraints) and eq. (6) (noisy
  measurements) solved as a linear program, with the l2 ball of eq. (6) replaced by a per-measurement
  box (see the function).

All functions take the sensing matrix as a :class:`~fl_sim.compression.base.LinearOperator`
(``forward``: x -> Phi x, ``adjoint``: y -> Phi^T y) except the LP, which needs the dense matrix.
"""

from __future__ import annotations

import math

import torch

from ..rng import torch_generator
from .base import CodecError, LinearOperator
from .sketch import topk_abs

__all__ = ["fiht", "biht", "l1_recovery_lp", "fast_operator", "LP_MAX_ENTRIES"]

LP_MAX_ENTRIES = 4_000_000  # d*m above which the dense LP is refused (memory and HiGHS time)


# ------------------------------------------------------------------------------------------------
# A faster evaluation of Tang's subsampled DCT (same matrix, different arithmetic)
# ------------------------------------------------------------------------------------------------
class _MakhoulDCT:
    """Orthonormal DCT-II / DCT-III of length N through one real FFT of length N (Makhoul 1980).

    DCT-II:  X_k = s_k Re(V_k e^{-i pi k / 2N}),  V = FFT(v),  v = (x_0, x_2, x_4, ..., x_5, x_3, x_1)
    DCT-III: V_k = e^{i pi k / 2N} (X_k / s_k - i X_{N-k} / s_{N-k}) (X_N := 0),  x = unpermute(IFFT(V))
    with s_0 = sqrt(1/N), s_k = sqrt(2/N). ``torch.fft`` is used because scipy's DCT is slow for lengths
    with a large prime factor: Tang's d = 668,426 = 2*11*23*1321 took 0.13 s per scipy DCT against
    0.017 s here.
    """

    def __init__(self, n: int, dtype: torch.dtype) -> None:
        self.n, self.h = n, n // 2 + 1
        k = torch.arange(n, dtype=torch.float64)
        s = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
        s[0] = math.sqrt(1.0 / n)
        fwd = torch.polar(s, -math.pi * k / (2 * n))  # s_k e^{-i pi k/2N}
        self.fr, self.fi = fwd.real.to(dtype), fwd.imag.to(dtype)
        kh = k[: self.h]
        rot = torch.polar(torch.ones_like(kh), math.pi * kh / (2 * n))
        a = rot / s[: self.h]  # multiplies X_k
        b = rot / math.sqrt(2.0 / n)  # multiplies -i X_{N-k}, k >= 1
        self.ar, self.ai = a.real.to(dtype), a.imag.to(dtype)
        self.br, self.bi = b.real.to(dtype), b.imag.to(dtype)
        self.perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
        self.inv = torch.argsort(self.perm)

    def dct(self, x: torch.Tensor) -> torch.Tensor:
        n, h = self.n, self.h
        spec = torch.fft.rfft(x.index_select(-1, self.perm))
        vr, vi = spec.real, spec.imag
        out = torch.empty_like(x)
        out[..., :h] = vr * self.fr[:h] - vi * self.fi[:h]
        if n > h:  # k >= h: V_k = conj(V_{N-k})
            out[..., h:] = vr[..., 1 : n - h + 1].flip(-1) * self.fr[h:] + vi[..., 1 : n - h + 1].flip(-1) * self.fi[h:]
        return out

    def idct(self, big_x: torch.Tensor) -> torch.Tensor:
        n, h = self.n, self.h
        xk = big_x[..., :h]
        xnk = torch.zeros_like(xk)  # X_{N-k} for k = 1..h-1 (X_N = 0 at k = 0)
        if h > 1:
            xnk[..., 1:] = big_x[..., n - h + 1 :].flip(-1)
        # V = a X_k - i b X_{N-k}, with complex a, b
        vr = self.ar * xk + self.bi * xnk
        vi = self.ai * xk - self.br * xnk
        v = torch.fft.irfft(torch.complex(vr, vi), n=n)
        return v.index_select(-1, self.inv)


class _FastSubsampledDCT(LinearOperator):
    """The operator of ``SubsampledOrthogonal(transform="dct")`` (same rows, signs and scale) evaluated
    with :class:`_MakhoulDCT`. Phi = sqrt(d/Q) S C D (C orthonormal DCT-II, S row selection, D signs)."""

    def __init__(self, op: LinearOperator, dtype: torch.dtype) -> None:
        self.base, self.m, self.d = op, op.m, op.d
        self.rows = op.rows.to(torch.int64)
        self.scale = math.sqrt(op.n / op.q)
        self.signs = op.signs.to(dtype) if op.use_signs else None
        self.t = _MakhoulDCT(op.d, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = x * self.signs
        return self.t.dct(x).index_select(-1, self.rows).mul_(self.scale)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        z = y.new_zeros(*y.shape[:-1], self.d).index_copy_(-1, self.rows, y * self.scale)
        z = self.t.idct(z)
        return z * self.signs if self.signs is not None else z


def fast_operator(op: LinearOperator, dtype: torch.dtype = torch.float32) -> LinearOperator:
    """``op`` itself, or an equivalent faster evaluation of it where one exists (subsampled DCT).

    The returned operator is the same matrix (tested against ``op``); only the arithmetic differs.
    """
    from .projections import SubsampledOrthogonal

    if isinstance(op, SubsampledOrthogonal) and op.transform == "dct" and op.d >= 2:
        return _FastSubsampledDCT(op, dtype)
    return op


# ------------------------------------------------------------------------------------------------
# FIHT
# ------------------------------------------------------------------------------------------------
def _check_measurements(y: torch.Tensor, op: LinearOperator, who: str) -> torch.Tensor:
    if not isinstance(op, LinearOperator):
        raise CodecError(f"{who}: op must be a LinearOperator (e.g. SubsampledOrthogonal), got {type(op).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.numel() != op.m:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CodecError(f"{who}: y must be a 1-D tensor of the operator's m = {op.m} measurements, got {shape}")
    if not torch.is_floating_point(y):
        raise CodecError(f"{who}: y must be floating point, got {y.dtype}")
    if not torch.isfinite(y).all():
        raise CodecError(f"{who}: y contains NaN or inf")
    return y.to(torch.float64 if y.dtype == torch.float64 else torch.float32)


def _check_sparsity(k: int, d: int, who: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CodecError(f"{who}: sparsity K must be a positive int, got {k!r}")
    return min(k, d)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, or 0 where den is 0 (guards every step size of FIHT)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _hard_threshold(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_K(h): (g, idx, mask) with g = h on the K largest |h_i| and 0 elsewhere."""
    idx = topk_abs(h, k)
    g = torch.zeros_like(h)
    g[idx] = h[idx]
    mask = torch.zeros(h.shape, dtype=torch.bool)
    mask[idx] = True
    return g, idx, mask


def fiht(
    y: torch.Tensor,
    op: LinearOperator,
    K: int,
    *,
    max_iter: int = 25,
    tol: float = 1e-4,
    stall_tol: float = 1e-2,
    window: int = 4,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """Fast IHT (Wei 2014): approximately solve min_z 0.5 ||y - Phi z||^2 s.t. ||z||_0 <= K.

    Steps (NOTES.md §4 [ext], the authors' FIHT.py); r(z) = Phi^T (y - Phi z), P_S restricts to S:

    1. init:   g = H_K(Phi^T y), Omega = supp(g).
       For s = 0, 1, ..., max_iter - 1:
    2. extrapolate: s = 0: w = g, Omega_w = Omega; else
                    tau = <y - Phi g, Phi(g - g_prev)> / ||Phi(g - g_prev)||^2,
                    w = g + tau (g - g_prev), Omega_w = Omega U Omega_prev.
    3. stop if ||y - Phi w|| <= tol ||y||, or (s >= window - 1) if std/mean of the last ``window``
       residual norms ||y - Phi w|| is below ``stall_tol``; return g.
    4. r_w = r(w),  alpha~ = ||P_{Omega_w} r_w||^2 / ||Phi P_{Omega_w} r_w||^2.
    5. hard threshold: g_prev = g, Omega_prev = Omega; g = H_K(w + alpha~ r_w), Omega = supp(g).
    6. r = r(g).
    7. support-restricted step: alpha = ||P_Omega r||^2 / ||Phi P_Omega r||^2,  g = g + alpha P_Omega r.

    Every ratio is guarded (0 when its denominator is 0), so y = 0 returns 0; y is divided by
    max_i |y_i| first (FIHT is scale-equivariant) so tiny or huge inputs neither underflow nor
    overflow. Phi w and Phi g are
    carried along by linearity, so an iteration costs 3 forward and 2 adjoint transforms. Deviation
    from the reference code: the residual test is relative (tol * ||y||), not absolute 1e-4, so the
    result does not depend on the scale of y.

    Args:
        y: (m,) measurements (float64 keeps float64 arithmetic, anything else runs in float32).
        op: the (m, d) sensing operator Phi; a subsampled DCT is evaluated by :func:`fast_operator`.
        K: sparsity of the output (K >= d means no thresholding).
        max_iter, tol, stall_tol, window: stopping rule of step 3.
        return_info: also return {"iterations", "residual" (||y - Phi g|| / ||y||)}.

    Returns:
        g (d,) with at most K nonzeros (and the info dict if asked).
    """
    who = "fiht"
    y = _check_measurements(y, op, who)
    K = _check_sparsity(K, op.d, who)
    if not isinstance(max_iter, int) or max_iter < 0:
        raise CodecError(f"{who}: max_iter must be an int >= 0, got {max_iter!r}")
    if window < 2:
        raise CodecError(f"{who}: window must be >= 2, got {window!r}")
    # FIHT is scale-equivariant: run it on y / max|y_i| so that squares of tiny or huge measurements
    # neither underflow nor overflow, and scale the result back.
    y_scale = float(y.abs().max())
    if y_scale == 0.0:
        zero = torch.zeros(op.d, dtype=y.dtype)
        return (zero, {"iterations": 0, "residual": 0.0}) if return_info else zero
    y = y / y_scale
    y_norm = float(torch.linalg.vector_norm(y))
    A = fast_operator(op, y.dtype)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return A.forward(x).to(y.dtype)

    def adj(r: torch.Tensor) -> torch.Tensor:
        return A.adjoint(r).to(y.dtype)

    # 1. init
    g, idx, mask = _hard_threshold(adj(y), K)
    phi_g = fwd(g)
    g_prev, phi_g_prev, mask_prev = g, phi_g, mask
    norms: list[float] = []
    it = 0
    for it in range(max_iter):
        # 2. extrapolation
        if it == 0:
            w, phi_w, mask_w = g, phi_g, mask
        else:
            d_phi = phi_g - phi_g_prev
            tau = _ratio(torch.dot(y - phi_g, d_phi), torch.dot(d_phi, d_phi))
            w = g + tau * (g - g_prev)
            phi_w = phi_g + tau * d_phi
            mask_w = mask | mask_prev
        # 3. stopping rule
        res_w = y - phi_w
        norms.append(float(torch.linalg.vector_norm(res_w)))
        if norms[-1] <= tol * y_norm:
            break
        if len(norms) >= window:
            last = torch.tensor(norms[-window:], dtype=torch.float64)
            if float(last.std(correction=0)) < stall_tol * float(last.mean()):
                break
        # 4. gradient at w, step size restricted to Omega_w
        r_w = adj(res_w)
        p = r_w * mask_w
        phi_p = fwd(p)
        alpha_t = _ratio(torch.dot(p, p), torch.dot(phi_p, phi_p))
        # 5. hard thresholding
        g_prev, phi_g_prev, mask_prev = g, phi_g, mask
        g, idx, mask = _hard_threshold(w + alpha_t * r_w, K)
        # 6. gradient at g
        phi_g = fwd(g)
        r = adj(y - phi_g)
        # 7. support-restricted gradient step
        p = torch.zeros_like(r)
        p[idx] = r[idx]
        phi_p = fwd(p)
        alpha = _ratio(torch.dot(p, p), torch.dot(phi_p, phi_p))
        g = g + alpha * p
        phi_g = phi_g + alpha * phi_p
    g = g * y_scale
    if return_info:
        residual = float(torch.linalg.vector_norm(y - phi_g)) / y_norm
        return g, {"iterations": it + 1 if max_iter else 0, "residual": residual}
    return g


# ------------------------------------------------------------------------------------------------
# BIHT
# ------------------------------------------------------------------------------------------------
def _row_scale(op: LinearOperator, probes: int = 8) -> float:
    """sigma with E[a a^T] ~ sigma^2 I for the rows a of Phi: sigma^2 = ||Phi||_F^2 / (m d), estimated
    with Gaussian probes z (E ||Phi z||^2 = ||Phi||_F^2), seeded so the estimate is deterministic."""
    z = torch.randn(probes, op.d, generator=torch_generator("biht", "row_scale", op.m, op.d))
    fro2 = float(op.forward(z).pow(2).sum()) / probes
    return math.sqrt(max(fro2, 0.0) / (op.m * op.d))


def biht(
    y_sign: torch.Tensor,
    op: LinearOperator,
    K: int,
    *,
    max_iter: int = 50,
    step: float | None = None,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary IHT for 1-bit measurements y = sign(Phi x + t); t = 0 (plain) or a known dither t.

    Plain (``threshold=None``), the normalized BIHT of Jacques et al. (2013) / Friedlander et al. (2021):
    only the direction is identifiable, the estimate has unit norm (the caller carries the norm).
    With a known dither ``threshold`` t (e.g. t = rho u of the 1-bit QCS quantizer) the scale is
    identifiable too (Knudson, Saab & Ward 2016): no normalization, x is estimated with its norm.

    1. sigma^2 = ||Phi||_F^2 / (m d), the row variance (1 for an i.i.d. N(0, 1) matrix), from 8 seeded
       Gaussian probes; step mu = ``step`` or
         plain:    sqrt(2 pi) / (m sigma)          (E[Phi^T sign(Phi x)] = m sigma sqrt(2/pi) x, ||x|| = 1)
         dithered: (max t - min t) / (m sigma^2)   (a threshold spread uniformly over its range flips
                                                    measurement i with probability |a_i (x - x*)| / range);
       x_0 = 0.
    2. a = x_t + (mu / 2) Phi^T (y - sign(Phi x_t + t))   (sign(0) = 0 at x_0 = 0 when t = 0, +1 afterwards)
    3. x_{t+1} = H_K(a) (K largest |a_i| kept), divided by its norm in the plain case.
    4. stop when sign(Phi x_{t+1} + t) = y (consistent) or x_{t+1} = x_t; else repeat 2-3.

    y = 0 (all measurements zero) returns the zero vector.

    Args:
        y_sign: (m,) entries in {-1, 0, +1} (any finite float: its sign is used).
        op: the (m, d) sensing operator Phi.
        K: sparsity (K >= d means no thresholding).
        max_iter: iterations of steps 2-3.
        step: mu; default as in step 1.
        threshold: (m,) known dither t, or None.
    """
    who = "biht"
    y = torch.sign(_check_measurements(y_sign, op, who))
    K = _check_sparsity(K, op.d, who)
    t_scale = 1.0
    if threshold is not None:
        t = _check_measurements(threshold, op, who + " (threshold)").to(y.dtype)
        t_scale = float(t.abs().max()) or 1.0
        t = t / t_scale  # sign(Phi x + t) = sign(Phi x/c + t/c): solve at unit scale, rescale at the end
    else:
        t = torch.zeros_like(y)
    if not torch.any(y != 0):
        return torch.zeros(op.d, dtype=y.dtype)
    m = op.m
    if step is None:
        sigma = _row_scale(op)
        spread = float(t.max() - t.min())
        if sigma == 0.0 or (threshold is not None and spread == 0.0):
            return torch.zeros(op.d, dtype=y.dtype)
        step = math.sqrt(2.0 * math.pi) / (m * sigma) if threshold is None else spread / (m * sigma**2)
    elif not step > 0:
        raise CodecError(f"{who}: step must be > 0, got {step!r}")

    def sgn(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v > 0, 1.0, -1.0).to(y.dtype)

    x = torch.zeros(op.d, dtype=y.dtype)
    residual = y if threshold is None else y - sgn(t)  # y - sign(Phi x_0 + t), sign(0) = 0 when t = 0
    for _ in range(max(1, max_iter)):
        # 2. gradient step on the one-sided consistency objective
        a = x + (0.5 * step) * op.adjoint(residual).to(y.dtype)
        # 3. hard threshold (and normalize in the plain case)
        x_new, _, _ = _hard_threshold(a, K)
        if threshold is None:
            nrm = torch.linalg.vector_norm(x_new)
            if nrm == 0:
                break
            x_new = x_new / nrm
        # 4. stopping rule
        residual = y - sgn(op.forward(x_new).to(y.dtype) + t)
        done = bool(torch.equal(x_new, x)) or not bool(torch.any(residual[y != 0] != 0))
        x = x_new
        if done:
            break
    return x * t_scale if threshold is not None else x


# ------------------------------------------------------------------------------------------------
# l1 recovery as a linear program
# ------------------------------------------------------------------------------------------------
def l1_recovery_lp(
    y: torch.Tensor, A_dense: torch.Tensor, eps: float | torch.Tensor | None = None
) -> torch.Tensor:
    """min ||x||_1 subject to y = A x (eps=None, Mitra & Khisti eq. 3) or |y - A x|_i <= eps_i (eq. 6).

    Eq. (6) bounds the l2 norm of the measurement error, ||y - A x||_2 <= eps, a second-order cone.
    Here the constraint is the per-measurement box ||y - A x||_inf <= eps (an l_inf ball), which keeps
    the problem a linear program: with a uniform quantizer of step Delta (or the dithered 1-bit
    quantizer, whose error is at most rho/2), every |e_i| <= Delta/2, so eps = Delta/2 makes the box
    exact (the true x is always feasible), whereas the l2 radius of eq. (5) holds only on average.

    LP in the split variables x = u - v, u, v >= 0 (2d variables):
        min 1^T u + 1^T v   s.t.  A(u - v) = y                      (eps None)
                                  A(u - v) <= y + eps, -A(u - v) <= eps - y   (otherwise)
    solved by ``scipy.optimize.linprog(method="highs")``. Dense: only for small blocks, d*m <= 4e6.

    Args:
        y: (m,) measurements.
        A_dense: (m, d) matrix.
        eps: None, a scalar >= 0 or an (m,) tensor of per-measurement bounds >= 0.

    Returns:
        x (d,) float32 (float64 if y is float64). y = 0 returns 0 without solving.
    """
    import numpy as np
    from scipy.optimize import linprog

    who = "l1_recovery_lp"
    if not isinstance(A_dense, torch.Tensor) or A_dense.dim() != 2 or not torch.is_floating_point(A_dense):
        raise CodecError(f"{who}: A_dense must be a 2-D floating-point tensor (the (m, d) sensing matrix)")
    m, d = A_dense.shape
    if m * d > LP_MAX_ENTRIES:
        raise CodecError(
            f"{who}: d*m = {d * m} exceeds {LP_MAX_ENTRIES:.0e}; recover block by block (e.g. block=256) "
            "or use recovery='biht' / 'none'"
        )
    if not torch.isfinite(A_dense).all():
        raise CodecError(f"{who}: A_dense contains NaN or inf")
    out_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.numel() != m:
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CodecError(f"{who}: y must be a 1-D tensor of m = {m} measurements, got {shape}")
    if not torch.is_floating_point(y) or not torch.isfinite(y).all():
        raise CodecError(f"{who}: y must be a finite floating-point tensor")
    if eps is not None:
        e = torch.as_tensor(eps, dtype=torch.float64).expand(m)
        if not torch.isfinite(e).all() or bool((e < 0).any()):
            raise CodecError(f"{who}: eps must be finite and >= 0, got {eps!r}")
    if not bool((y != 0).any()):
        return torch.zeros(d, dtype=out_dtype)
    # scale y (and eps) by max|y_i| so HiGHS's absolute tolerances (1e-7) act relative to the data
    y_scale = float(y.detach().abs().max())
    a = A_dense.detach().to(torch.float64).numpy()
    yn = y.detach().to(torch.float64).numpy() / y_scale
    a2 = np.hstack([a, -a])  # A (u - v)
    c = np.ones(2 * d)
    if eps is None:
        res = linprog(c, A_eq=a2, b_eq=yn, bounds=(0, None), method="highs")
    else:
        en = e.numpy() / y_scale
        res = linprog(c, A_ub=np.vstack([a2, -a2]), b_ub=np.concatenate([yn + en, en - yn]), bounds=(0, None),
                      method="highs")
    if res.status != 0 or res.x is None:
        raise CodecError(f"{who}: linprog did not solve the LP ({res.message}); check that y = A x is feasible")
    x = (res.x[:d] - res.x[d:]) * y_scale
    return torch.from_numpy(x).to(out_dtype)
