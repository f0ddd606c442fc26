"""Sparse recovery from linear measurements: FIHT, binary IHT and the l1 linear program.

* :func:`fiht` - Fast Iterative Hard Thresholding ([Wei-FIHT]), the decoder of [Tang-FIHT]
  (slides; docs/notes.md#tang-fiht, and docs/notes.md#tang-fiht-steps for the steps, which the slides
  do not give).
* :func:`biht` - Binary Iterative Hard Thresholding ([Jacques-2013]: Jacques, Laska, Boufounos & Baraniuk
  2013) for 1-bit measurements y = sign(Phi x), in its normalized form ([Friedlander-2021]); used by the
  1-bit QCS codec of [Mitra-Khisti-2020] (eqs. 4, 9).
* :func:`l1_recovery_lp` - Mitra & Khisti eq. (3) (equality constraints) and eq. (6) (noisy
  measurements) solved as a linear program, with the l2 ball of eq. (6) replaced by a per-measurement
  box (see the function).

All functions take the sensing matrix as a :class:`~fl_sim.compression.base.LinearOperator`
(``forward``: x -> Phi x, ``adjoint``: y -> Phi^T y) except the LP, which needs the dense matrix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fl_sim.rng import torch_generator
from fl_sim.compression.base import CodecError, LinearOperator
from fl_sim.compression.recovery_ops import array_calls, fast_operator
from fl_sim.compression.sketch import topk_abs

__all__ = ["fiht", "biht", "l1_recovery_lp", "fast_operator", "sparsity_schedule", "LP_MAX_ENTRIES"]

LP_MAX_ENTRIES = 4_000_000  # d*m above which the dense LP is refused (memory and HiGHS time)


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
    y = y.detach().to("cpu", torch.float64 if y.dtype == torch.float64 else torch.float32)
    # NumPy's check: torch.isfinite(...).all() spends tens of ms in OpenMP start-up on a loaded 2-core machine
    if not np.isfinite(y.numpy()).all():
        raise CodecError(f"{who}: y contains NaN or inf")
    return y


def _check_sparsity(k: int, d: int, who: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CodecError(f"{who}: sparsity K must be a positive int, got {k!r}")
    return min(k, d)


def _safe_div(num: float, den: float) -> float:
    """num / den, or 0 when den is 0 (guards every step size of FIHT, so y = 0 or a stalled iterate is safe)."""
    return num / den if den > 0 else 0.0


def _hard_threshold(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_K(h): (g, idx, mask) with g = h on the K largest |h_i| and 0 elsewhere."""
    idx = topk_abs(h, k)
    g = torch.zeros_like(h)
    g[idx] = h[idx]
    mask = torch.zeros(h.shape, dtype=torch.bool)
    mask[idx] = True
    return g, idx, mask


def _hard_threshold_np(h, k: int):
    """H_k(h) on a NumPy array: (g, mask), g = h on the k largest |h_i| (exactly k, ties by argpartition).

    ``np.argpartition`` is a single introselect pass: 1 ms at d = 668,426, k = 30,000, against 6 ms for
    ``torch.topk`` on the same machine.
    """
    d = h.shape[0]
    mask = np.zeros(d, dtype=bool)
    if k >= d:
        mask[:] = True
    else:
        mask[np.argpartition(np.abs(h), d - k)[d - k :]] = True
    return np.where(mask, h, 0).astype(h.dtype, copy=False), mask


def sparsity_schedule(K: int, m: int, start: float | None) -> list[int]:
    """Sparsity levels of FIHT's continuation: k_0 = ceil(start * m) (at least 1), doubled each iteration, capped
    at K; ``start=None`` (or k_0 >= K) gives [K] (classic FIHT). The last entry is always K."""
    if start is None:
        return [K]
    levels = [min(K, max(1, math.ceil(start * m)))]
    while levels[-1] < K:
        levels.append(min(K, 2 * levels[-1]))
    return levels


def fiht(
    y: torch.Tensor,
    op: LinearOperator,
    K: int,
    *,
    max_iter: int = 25,
    tol: float = 1e-6,
    stall_tol: float = 1e-2,
    window: int = 4,
    min_decrease: float | None = 0.1,
    start: float | None = 1 / 128,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """Modified FIHT: fast IHT ([Wei-FIHT]) with a sparsity continuation: approximately solve
    min_z 0.5 ||y - Phi z||^2 s.t. ||z||_0 <= K. FIHT is the decoder of [Tang-FIHT] (slides; steps from the
    authors' FIHT.py, docs/notes.md#tang-fiht-steps); [Wei-FIHT]: K. Wei, "Fast iterative hard thresholding
    for compressed sensing", IEEE SPL 22(5), 2015 (arXiv 2014).

    r(z) = Phi^T (y - Phi z); P_S restricts to S; H_k keeps the k largest |entries|; k_s are the levels of
    :func:`sparsity_schedule` (k_s = K for every s once the schedule is exhausted, and from the start if
    ``start=None``).

    1. init:   g = H_{k_0}(Phi^T y), Omega = supp(g).
       For s = 0, 1, ..., max_iter - 1:
    2. extrapolate: s = 0: w = g, Omega_w = Omega; else
                    tau = <y - Phi g, Phi(g - g_prev)> / ||Phi(g - g_prev)||^2,
                    w = g + tau (g - g_prev), Omega_w = Omega U Omega_prev.
    3. stop if ||y - Phi w|| <= tol ||y||, or (s >= window - 1) if std/mean of the last ``window``
       residual norms ||y - Phi w|| is below ``stall_tol`` (the reference's rules); return g.
    4. r_w = r(w),  alpha~ = ||P_{Omega_w} r_w||^2 / ||Phi P_{Omega_w} r_w||^2.
    5. hard threshold: g_prev = g, Omega_prev = Omega; g = H_{k_{s+1}}(w + alpha~ r_w), Omega = supp(g).
    6. r = r(g).
    7. support-restricted step: alpha = ||P_Omega r||^2 / ||Phi P_Omega r||^2,  g = g + alpha P_Omega r.
    8. stop (return g) if the sparsity is K and ||y - Phi g|| > (1 - ``min_decrease``) times its value one
       iteration earlier (also at K): the residual no longer falls by a useful fraction per iteration.

    Why the continuation (steps 1, 5) and rule 8 (deviations from the reference code; ``start=None,
    min_decrease=None`` restores it): H_K(Phi^T y) at K = 30,000 from Q = 66,842 DCT measurements
    (d = 668,426, Tang's sizes) keeps mostly aliasing noise (Phi^T y = x + noise of norm ~sqrt(d/Q - 1) ||x||),
    and the plain iteration then needs 25 iterations to reach a relative error of 0.10 on a power-law vector
    x_i ~ +-i^-1.2 (best K-term error 0.0005). Starting from k_0 = Q/128, where recovery is easy, and doubling
    up to K picks the large entries first: 0.003 after 9 iterations, and better than the reference for every
    exponent 0.8-1.2 and d/Q in 2-10 measured (`fl-sim bench recovery`, docs/performance.md; a faster
    growth, e.g. from Q/32, is markedly worse). For compressible (not exactly sparse)
    vectors the residual keeps falling by a few per cent per iteration long after the error has levelled
    off, so the reference's 1 % std/mean rule rarely fires; rule 8 stops there, and on exactly sparse vectors
    once the float32 residual floor is reached.

    Why ``tol = 1e-6`` (relative): on exactly K-sparse vectors the loop stops on rule 3's tolerance, and the
    previous default 1e-4 left relative errors of 3e-5 to 1.6e-4 where the authors' FIHT.py (absolute 1e-4 on
    an unnormalized y, i.e. about 1e-6 relative at these sizes) reaches 1e-7 to 1e-5. With 1e-6 the error is
    4e-7 to 1.7e-6 (d = 1,024 to 668,426, d/Q = 4 to 10, DCT and WHT; tests/test_recovery.py), for two more
    iterations on exactly sparse input. On compressible input (Tang's size, benchmarks) rule 8 stops long
    before the residual reaches either tolerance, so speed there is unchanged. The float32 residual floor is
    about 1e-7: tolerances below it end on rule 8 instead.

    The reference schedule of FIHT.py is ``start=None, min_decrease=None`` (and ``tol`` to taste: the
    reference's absolute 1e-4 has no scale-free equivalent); the ``cs_fiht`` codec and the FIHTCS strategy
    expose ``start``, ``min_decrease`` and ``tol`` as options.

    Every ratio is guarded (0 when its denominator is 0), so y = 0 returns 0; y is divided by
    max_i |y_i| first (FIHT is scale-equivariant) so tiny or huge inputs neither underflow nor
    overflow. Phi w and Phi g are carried along by linearity, so an iteration costs 3 forward and
    2 adjoint transforms. The loop runs on NumPy arrays (a subsampled DCT/WHT through
    :func:`fast_operator`), top-K by ``np.argpartition``. The residual test is relative (tol * ||y||),
    not absolute 1e-4, so the result does not depend on the scale of y.

    Args:
        y: (m,) measurements (float64 keeps float64 arithmetic, anything else runs in float32).
        op: the (m, d) sensing operator Phi; a subsampled DCT/WHT is evaluated by :func:`fast_operator`.
        K: sparsity of the output (K >= d means no thresholding).
        max_iter, tol, stall_tol, window: stopping rules of step 3.
        min_decrease: rule 8 (None: off).
        start: first sparsity level as a fraction of m (None: K from the start, the classic FIHT).
        return_info: also return {"iterations", "residual" (||y - Phi g|| / ||y||), "stop" (which rule:
            "tol", "stall", "min_decrease", "max_iter", or "zero" for y = 0), "sparsity" (the final level)}.

    Returns:
        g (d,) with at most K nonzeros (and the info dict if asked).
    """
    who = "fiht"
    y_t = _check_measurements(y, op, who)
    K = _check_sparsity(K, op.d, who)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise CodecError(f"{who}: max_iter must be an int >= 0, got {max_iter!r}")
    if window < 2:
        raise CodecError(f"{who}: window must be >= 2, got {window!r}")
    if min_decrease is not None and not 0.0 <= min_decrease < 1.0:
        raise CodecError(f"{who}: min_decrease must be in [0, 1) or None, got {min_decrease!r}")
    if start is not None and not start > 0:
        raise CodecError(f"{who}: start must be > 0 (a fraction of the m measurements) or None, got {start!r}")
    out_dtype = y_t.dtype
    # FIHT is scale-equivariant: run it on y / max|y_i| so that squares of tiny or huge measurements
    # neither underflow nor overflow, and scale the result back.
    y_scale = float(np.abs(y_t.numpy()).max())
    if y_scale == 0.0:
        zero = torch.zeros(op.d, dtype=out_dtype)
        info = {"iterations": 0, "residual": 0.0, "stop": "zero", "sparsity": K}
        return (zero, info) if return_info else zero
    yv = (y_t / y_scale).numpy()
    dt = yv.dtype.type
    y_norm = float(np.linalg.norm(yv))
    fwd, adj = array_calls(fast_operator(op, out_dtype), yv.dtype)

    def sq(v) -> float:
        return float(np.dot(v, v))

    levels = sparsity_schedule(K, op.m, start)
    # 1. init
    g, mask = _hard_threshold_np(adj(yv), levels[0])
    phi_g = fwd(g)
    g_prev, phi_g_prev, mask_prev = g, phi_g, mask
    norms: list[float] = []
    res_g: list[float] = []  # ||y - Phi g|| after step 7, at sparsity K only
    stop, it, level = "max_iter", 0, levels[0]
    for it in range(max_iter):
        # 2. extrapolation
        if it == 0:
            w, phi_w, mask_w = g, phi_g, mask
        else:
            d_phi = phi_g - phi_g_prev
            tau = dt(_safe_div(float(np.dot(yv - phi_g, d_phi)), sq(d_phi)))
            w = g + tau * (g - g_prev)
            phi_w = phi_g + tau * d_phi
            mask_w = mask | mask_prev
        # 3. stopping rules of the reference
        res_w = yv - phi_w
        norms.append(math.sqrt(sq(res_w)))
        if norms[-1] <= tol * y_norm:
            stop = "tol"
            break
        if len(norms) >= window:
            last = np.asarray(norms[-window:])
            if float(last.std()) < stall_tol * float(last.mean()):
                stop = "stall"
                break
        # 4. gradient at w, step size restricted to Omega_w
        r_w = adj(res_w)
        p = np.where(mask_w, r_w, dt(0))
        alpha_t = dt(_safe_div(sq(p), sq(fwd(p))))
        # 5. hard thresholding at the next sparsity level
        level = levels[min(it + 1, len(levels) - 1)]
        g_prev, phi_g_prev, mask_prev = g, phi_g, mask
        g, mask = _hard_threshold_np(w + alpha_t * r_w, level)
        # 6. gradient at g
        phi_g = fwd(g)
        r = adj(yv - phi_g)
        # 7. support-restricted gradient step
        p = np.where(mask, r, dt(0))
        phi_p = fwd(p)
        alpha = dt(_safe_div(sq(p), sq(phi_p)))
        g = g + alpha * p
        phi_g = phi_g + alpha * phi_p
        # 8. relative-decrease rule, once the continuation has reached K
        if level == K and min_decrease is not None:
            res_g.append(math.sqrt(sq(yv - phi_g)))
            if len(res_g) >= 2 and res_g[-1] > (1.0 - min_decrease) * res_g[-2]:
                stop = "min_decrease"
                it += 1
                break
    else:
        it = max_iter
    g_out = torch.from_numpy(np.ascontiguousarray(g * dt(y_scale))).to(out_dtype)
    if return_info:
        residual = math.sqrt(sq(yv - phi_g)) / y_norm
        return g_out, {"iterations": it, "residual": residual, "stop": stop, "sparsity": int(level)}
    return g_out


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
