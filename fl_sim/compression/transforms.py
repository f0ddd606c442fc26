"""Fast orthogonal transforms: Walsh-Hadamard (fwht) and orthonormal DCT-II / DCT-III (dct, idct).

Papers (keys of docs/references.md; equations in docs/notes.md):
  * [Abdi-thesis] Ch. 4 eq. (4.1)-(4.2): ``v = (1/sqrt(k)) H (r * g)`` needs ``H g`` for the n x n Sylvester Hadamard
    matrix H_n (entries +-1), computed here in O(n log n) by :func:`fwht`; Ch. 5 eq. (5.3) uses the same transform.
  * [Tang-FIHT] (slides; docs/notes.md#tang-fiht): the sensing matrix is Q random rows of the d x d orthonormal DCT or WHT;
    :func:`dct` / :func:`idct` are that DCT and its inverse (= transpose).

``fwht(x)`` equals ``scipy.linalg.hadamard(n) @ x`` along the last dimension (natural / Sylvester order,
unnormalized: ``fwht(fwht(x)) = n x``). Zero in, zero out; NaN/inf are not scanned for here (an extra pass over
memory): codecs validate their input with ``check_vector`` first.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fl_sim.compression.base import CodecError

__all__ = ["fwht", "dct", "idct", "next_pow2"]


def next_pow2(n: int) -> int:
    """The smallest power of 2 that is >= n (n >= 1): next_pow2(1) = 1, next_pow2(1000) = 1024."""
    if not isinstance(n, int) or n < 1:
        raise CodecError(f"next_pow2: n must be a positive int, got {n!r}")
    return 1 << (n - 1).bit_length()


def _check_fwht_input(x: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"fwht: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise CodecError("fwht: expected at least a 1-D tensor, got a scalar")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise CodecError(
            f"fwht: last dimension must be a power of 2, got {n}; zero-pad to next_pow2({n}) = "
            f"{next_pow2(max(n, 1))} first"
        )
    if not torch.is_floating_point(x):
        raise CodecError(f"fwht: expected a floating-point tensor, got {x.dtype}")
    return n


def _fwht_torch(x: torch.Tensor) -> torch.Tensor:
    """Radix-2 butterfly in plain torch (differentiable, any device): log2(n) passes of (a+b, a-b)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        z = y.view(-1, n // (2 * h), 2, h)
        a, b = z[:, :, 0, :], z[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2).view(-1, n)
        h *= 2
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------------------------------------------
# numba kernel.  Why this design (measured on the 2-core AMD EPYC dev box, float32, best of 5, same process):
#   * naive torch butterfly (one pass per stage, 20 passes over memory at n = 2^20): 12 ms vs torch.fft.rfft 9.6 ms.
#   * numba indexes a[j + h] with wraparound checks and cannot prove that a[j] and a[j + h] do not alias, so a
#     plain index loop stays scalar (0.25-0.6 ns per element and stage).  Writing each butterfly leg as a slice
#     view (a0 = b[g:g+h], a1 = b[g+h:g+2h]) and looping over the view lets LLVM vectorize with one runtime
#     overlap check: 0.04-0.08 ns per element and stage for h >= 64 (AVX2).
#   * radix-8 passes (three stages per pass) cut the passes over memory by 3.
#   * cache blocking: phase 1 does the low log2(L) stages inside blocks of L = 128 KiB (fits the 512 KiB L2);
#     phase 2 does the remaining log2(n/L) stages on column panels of the (n/L, L) view, copied into a
#     256 KiB scratch buffer (rows of w contiguous values), so every element crosses main memory twice in all.
#   * threads: both phases split their independent items over torch.get_num_threads() Python threads (the
#     kernels are nogil).  numba's parallel=True (prange) was as fast but doubled the cold JIT time (37 s vs
#     17 s, paid once per checkout: cache=True) and brings OpenMP fork-safety issues.
#   Result (2 threads; rfft also uses 2): n = 2^20: 2.3 ms vs rfft 8.8 ms (0.26); n = 2^23: 27 ms vs 124 ms (0.22).
#   The h = 1 and h = 8 radix-8 passes stay the slowest (short inner loops); a constant-geometry variant
#   vectorizes better but needs a bit rotation that costs as much as it saves.
# Small dense Hadamard blocks as matmuls were rejected: 2*64 flops per element per 6 stages vs 6 adds.
# --------------------------------------------------------------------------------------------------------------
try:  # pragma: no cover - exercised implicitly; the torch path is tested separately
    from numba import njit

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    _HAVE_NUMBA = False

_BLOCK_BYTES = 1 << 17  # phase-1 block (L2-resident)
_PANEL_BYTES = 1 << 18  # phase-2 scratch panel
_PARALLEL_MIN = 1 << 18  # below this many elements one thread is as fast as two (measured at 2^16, 2^18)

if _HAVE_NUMBA:

    @njit(cache=True, fastmath=True)
    def _radix8_h1(b):  # pragma: no cover - compiled
        """Stages h = 1, 2, 4 on consecutive groups of 8 (scalar; the views trick needs h >= 8)."""
        for g in range(0, b.size, 8):
            x0 = b[g]; x1 = b[g + 1]; x2 = b[g + 2]; x3 = b[g + 3]  # noqa: E702
            x4 = b[g + 4]; x5 = b[g + 5]; x6 = b[g + 6]; x7 = b[g + 7]  # noqa: E702
            y0 = x0 + x1; y1 = x0 - x1; y2 = x2 + x3; y3 = x2 - x3  # noqa: E702
            y4 = x4 + x5; y5 = x4 - x5; y6 = x6 + x7; y7 = x6 - x7  # noqa: E702
            z0 = y0 + y2; z1 = y1 + y3; z2 = y0 - y2; z3 = y1 - y3  # noqa: E702
            z4 = y4 + y6; z5 = y5 + y7; z6 = y4 - y6; z7 = y5 - y7  # noqa: E702
            b[g] = z0 + z4; b[g + 1] = z1 + z5; b[g + 2] = z2 + z6; b[g + 3] = z3 + z7  # noqa: E702
            b[g + 4] = z0 - z4; b[g + 5] = z1 - z5; b[g + 6] = z2 - z6; b[g + 7] = z3 - z7  # noqa: E702

    @njit(cache=True, fastmath=True)
    def _radix8(b, h):  # pragma: no cover - compiled
        """Stages h, 2h, 4h on every group of 8h consecutive values of b (b.size a multiple of 8h)."""
        for g in range(0, b.size, 8 * h):
            a0 = b[g:g + h]; a1 = b[g + h:g + 2 * h]; a2 = b[g + 2 * h:g + 3 * h]  # noqa: E702
            a3 = b[g + 3 * h:g + 4 * h]; a4 = b[g + 4 * h:g + 5 * h]; a5 = b[g + 5 * h:g + 6 * h]  # noqa: E702
            a6 = b[g + 6 * h:g + 7 * h]; a7 = b[g + 7 * h:g + 8 * h]  # noqa: E702
            for j in range(h):
                x0 = a0[j]; x1 = a1[j]; x2 = a2[j]; x3 = a3[j]  # noqa: E702
                x4 = a4[j]; x5 = a5[j]; x6 = a6[j]; x7 = a7[j]  # noqa: E702
                y0 = x0 + x1; y1 = x0 - x1; y2 = x2 + x3; y3 = x2 - x3  # noqa: E702
                y4 = x4 + x5; y5 = x4 - x5; y6 = x6 + x7; y7 = x6 - x7  # noqa: E702
                z0 = y0 + y2; z1 = y1 + y3; z2 = y0 - y2; z3 = y1 - y3  # noqa: E702
                z4 = y4 + y6; z5 = y5 + y7; z6 = y4 - y6; z7 = y5 - y7  # noqa: E702
                a0[j] = z0 + z4; a1[j] = z1 + z5; a2[j] = z2 + z6; a3[j] = z3 + z7  # noqa: E702
                a4[j] = z0 - z4; a5[j] = z1 - z5; a6[j] = z2 - z6; a7[j] = z3 - z7  # noqa: E702

    @njit(cache=True, fastmath=True)
    def _radix4(b, h):  # pragma: no cover - compiled
        """Stages h, 2h on every group of 4h consecutive values of b."""
        for g in range(0, b.size, 4 * h):
            a0 = b[g:g + h]; a1 = b[g + h:g + 2 * h]; a2 = b[g + 2 * h:g + 3 * h]  # noqa: E702
            a3 = b[g + 3 * h:g + 4 * h]
            for j in range(h):
                x0 = a0[j]; x1 = a1[j]; x2 = a2[j]; x3 = a3[j]  # noqa: E702
                y0 = x0 + x1; y1 = x0 - x1; y2 = x2 + x3; y3 = x2 - x3  # noqa: E702
                a0[j] = y0 + y2; a1[j] = y1 + y3; a2[j] = y0 - y2; a3[j] = y1 - y3  # noqa: E702

    @njit(cache=True, fastmath=True)
    def _radix2(b, h):  # pragma: no cover - compiled
        """Stage h on every group of 2h consecutive values of b."""
        for g in range(0, b.size, 2 * h):
            a0 = b[g:g + h]; a1 = b[g + h:g + 2 * h]  # noqa: E702
            for j in range(h):
                x0 = a0[j]; x1 = a1[j]  # noqa: E702
                a0[j] = x0 + x1; a1[j] = x0 - x1  # noqa: E702

    @njit(cache=True, fastmath=True)
    def _stages(b, h):  # pragma: no cover - compiled
        """All stages h, 2h, ..., b.size/2 on b in place: radix-8 passes, then one radix-4 or radix-2 pass."""
        n = b.size
        while h < n:
            r = n // h
            if r >= 8:
                if h == 1:
                    _radix8_h1(b)
                else:
                    _radix8(b, h)
                h *= 8
            elif r == 4:
                _radix4(b, h)
                h *= 4
            else:
                _radix2(b, h)
                h *= 2

    @njit(cache=True, fastmath=True, nogil=True)
    def _blocks(src, dst, L, t0, t1):  # pragma: no cover - compiled
        """Phase 1, work items t0..t1-1 (item t = row t // nb, block t % nb): copy the block from src to dst
        (skipped when they share memory) and do its low log2(L) stages in cache."""
        nb = dst.shape[1] // L
        same = src.ctypes.data == dst.ctypes.data
        for t in range(t0, t1):
            r = t // nb
            s = (t % nb) * L
            b = dst[r, s:s + L]
            if not same:
                b[:] = src[r, s:s + L]
            _stages(b, 1)

    @njit(cache=True, fastmath=True, nogil=True)
    def _panels(dst, L, w, t0, t1):  # pragma: no cover - compiled
        """Phase 2, work items t0..t1-1: column panel [c0, c0 + w) of the (M, L) view of one row is copied to a
        scratch (M, w) buffer, whose flat stages w, 2w, ..., (M/2)w are the length-M transform of each column
        (the high log2(M) stages), then copied back."""
        M = dst.shape[1] // L
        npan = L // w
        buf = np.empty(M * w, dst.dtype)
        for t in range(t0, t1):
            r = t // npan
            c0 = (t % npan) * w
            for i in range(M):
                buf[i * w:(i + 1) * w] = dst[r, i * L + c0:i * L + c0 + w]
            _stages(buf, w)
            for i in range(M):
                dst[r, i * L + c0:i * L + c0 + w] = buf[i * w:(i + 1) * w]


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """[t0, t1) ranges cutting range(count) into at most ``parts`` near-equal pieces."""
    parts = max(1, min(parts, count))
    edges = [count * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()
_CHUNKS_PER_THREAD = 4  # dynamic load balance: a thread slowed by another process just takes fewer chunks


def _run_parallel(fn, args: tuple, count: int, threads: int) -> None:
    """Run fn(*args, t0, t1) over chunks of range(count) on ``threads`` threads (the calling thread included).

    Chunks are handed out from a shared counter, so on a loaded machine the work follows the free cores.
    The numba kernels release the GIL.
    """
    global _POOL, _POOL_SIZE
    if threads <= 1 or count <= 1:
        fn(*args, 0, count)
        return
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < threads - 1:
            _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="fl_sim_fwht")
            _POOL_SIZE = threads - 1
        pool = _POOL
    chunks = _split(count, threads * _CHUNKS_PER_THREAD)
    counter = itertools.count()  # next() on a count is atomic under the GIL

    def worker() -> None:
        for i in iter(counter.__next__, None):
            if i >= len(chunks):
                return
            fn(*args, *chunks[i])

    futures = [pool.submit(worker) for _ in range(threads - 1)]
    worker()
    for f in futures:
        f.result()


def _fwht_numba(src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst = H src along the last dim (src, dst contiguous CPU float32/float64 of the same shape; may be the same).

    Phase 1 (blocks) and phase 2 (column panels) each split their independent work items over
    ``torch.get_num_threads()`` threads; inputs below 2^18 elements run on the calling thread only.
    """
    n = src.shape[-1]
    a = src.detach().reshape(-1, n).numpy()
    b = dst.detach().reshape(-1, n).numpy()
    rows = b.shape[0]
    L = min(n, _BLOCK_BYTES // b.itemsize)
    M = n // L
    threads = torch.get_num_threads() if b.size >= _PARALLEL_MIN else 1
    _run_parallel(_blocks, (a, b, L), rows * M, threads)
    if M > 1:
        w = min(L, max(8, (_PANEL_BYTES // b.itemsize) // M))
        _run_parallel(_panels, (b, L, w), rows * (L // w), threads)


def _use_numba(x: torch.Tensor) -> bool:
    return (
        _HAVE_NUMBA
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not (x.requires_grad and torch.is_grad_enabled())
    )


def fwht(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dimension: ``y = H_n x``.

    H_n is the n x n Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]), n a power of 2,
    so ``fwht(x) == scipy.linalg.hadamard(n) @ x`` and ``fwht(fwht(x)) == n * x``. Batched over leading
    dimensions. float32 and float64 are computed in their own precision; float16 / bfloat16 are computed in
    float32 and returned as float32.

    CPU tensors use a cache-blocked numba kernel (threads: ``torch.get_num_threads()``); tensors that need
    autograd, tensors on other devices, or a missing numba use a plain torch butterfly.

    Args:
        x: tensor of shape (..., n), n a power of 2.
        inplace: overwrite ``x`` (must be float32/float64) and return it.
    """
    _check_fwht_input(x)
    if inplace and x.dtype not in (torch.float32, torch.float64):
        raise CodecError(f"fwht: inplace=True needs a float32/float64 tensor, got {x.dtype}; use inplace=False")
    src = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    if not _use_numba(src):
        y = _fwht_torch(src)
        if inplace:
            with torch.no_grad():
                x.copy_(y)
            return x
        return y
    if inplace and x.is_contiguous():
        _fwht_numba(x, x)
        return x
    src = src.contiguous()
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    _fwht_numba(src, out)
    if inplace:
        x.copy_(out)
        return x
    return out


# --------------------------------------------------------------------------------------------------------------
# DCT.  scipy.fft (pocketfft) is fast when d has only small prime factors, but a large prime factor inside a
# composite length runs as a generic O(p) radix pass: d = 668,426 = 2 * 11 * 23 * 1321 (Tang et al.'s ResNet)
# took 106-110 ms vs 5.8-6.9 ms at next_fast_len(d) = 675,000 (19x); torch.fft.rfft(d) is as slow (~100 ms).
# A lone prime length is fast (253 batched FFTs of length 1321: 3.5-7 ms; pocketfft uses Bluestein for it).
# So for such d: Makhoul's reordering (DCT = one length-d real DFT + twiddle), the real DFT by one complex DFT
# of length d/2 (even/odd packing), and that DFT by one Cooley-Tukey step splitting off the large prime.
# Tried first: a full Bluestein chirp-z DFT (2 complex FFTs of 670,824 points): 22-26 ms (4-5x).
# The glue is numpy (single-threaded elementwise ops): the same code in torch ran each of its ~20 elementwise
# ops through a 2-thread OpenMP region and, on a machine loaded by other processes, took 15x instead of 3x.
# Measured (1 thread, loaded machine): dct 26 ms vs 7.4 ms at 675,000 (3.5x), idct 28 ms vs 13 ms (2.1x).
# --------------------------------------------------------------------------------------------------------------
_SPLIT_MIN_PRIME = 101  # split off prime factors above this ...
_SPLIT_MIN_LEN = 4096  # ... when d is at least this long (below, the direct O(d p) transform is cheap)


def _largest_prime_factor(n: int) -> int:
    p, largest = 2, 1
    while p * p <= n:
        while n % p == 0:
            largest, n = p, n // p
        p += 1
    return max(largest, n) if n > 1 else largest


def _scipy_threads() -> int:
    return max(1, torch.get_num_threads())


def _cdtype(real: np.dtype) -> type:
    return np.complex128 if real == np.float64 else np.complex64


@functools.lru_cache(maxsize=16)
def _twiddle(count: int, denom: int, sign: float, cdtype: type) -> np.ndarray:
    """exp(sign * i pi k / denom) for k < count (computed in float64, cached, read-only)."""
    out = np.exp((sign * math.pi / denom) * 1j * np.arange(count, dtype=np.float64)).astype(cdtype)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=8)
def _split_twiddle(n1: int, n2: int, cdtype: type) -> np.ndarray:
    """(n2, n1) table W_L^(j2 k1) = exp(-2 pi i j2 k1 / L), L = n1 n2 (exponent reduced mod L in int64)."""
    L = n1 * n2
    e = (np.arange(n2, dtype=np.int64)[:, None] * np.arange(n1, dtype=np.int64)[None, :]) % L
    out = np.exp((-2j * math.pi / L) * e.astype(np.float64)).astype(cdtype)
    out.flags.writeable = False
    return out


def _dft(z: np.ndarray) -> np.ndarray:
    """Complex DFT along the last axis, X_k = sum_j z_j exp(-2 pi i j k / L).

    One Cooley-Tukey step splits off the largest prime factor p of L (L = p * L2, j = L2 j1 + j2,
    k = k1 + p k2): L2 batched length-p FFTs (a lone prime length is fast: pocketfft uses Bluestein for it),
    twiddles W_L^(j2 k1), then p length-L2 DFTs (recursively). Lengths whose prime factors are all <= 101 go
    straight to scipy.fft.fft.
    """
    import scipy.fft

    L = z.shape[-1]
    p = _largest_prime_factor(L)
    if p == L or p <= _SPLIT_MIN_PRIME:
        return scipy.fft.fft(z, axis=-1, workers=_scipy_threads())
    lead, n2 = z.shape[:-1], L // p
    a = scipy.fft.fft(z.reshape(*lead, p, n2).swapaxes(-1, -2), axis=-1, workers=_scipy_threads())  # (j2, k1)
    a *= _split_twiddle(p, n2, z.dtype.type)
    b = _dft(np.ascontiguousarray(a.swapaxes(-1, -2)))  # (..., k1, k2)
    return b.swapaxes(-1, -2).reshape(*lead, L)  # flat index k2 * p + k1


def _idft(z: np.ndarray) -> np.ndarray:
    """Inverse DFT along the last axis: conj(DFT(conj(Z))) / L."""
    out = _dft(z.conj()).conj()
    out /= z.shape[-1]
    return out


def _real_dft_full(v: np.ndarray) -> np.ndarray:
    """All N DFT coefficients of a real (..., N) array; even N through one complex DFT of length N/2."""
    N = v.shape[-1]
    cdtype = _cdtype(v.dtype)
    if N % 2:
        return _dft(v.astype(cdtype))
    h = N // 2
    Z = _dft(np.ascontiguousarray(v).view(cdtype))  # z_j = v_2j + i v_(2j+1)
    Zc = np.roll(Z[..., ::-1], 1, axis=-1).conj()  # conj(Z[(h - k) mod h])
    E = (Z + Zc) * 0.5  # DFT of the even samples
    O = (Z - Zc) * _twiddle(h, h, -1.0, cdtype)  # W^k * DFT of the odd samples, W = exp(-2 pi i / N)
    O *= -0.5j
    return np.concatenate((E + O, E - O), axis=-1)


def _real_idft_full(V: np.ndarray, real_dtype: np.dtype) -> np.ndarray:
    """Real (..., N) signal from its N (Hermitian) DFT coefficients; even N through one inverse DFT of N/2."""
    N = V.shape[-1]
    if N % 2:
        return _idft(V).real.astype(real_dtype)
    h = N // 2
    E = V[..., :h] + V[..., h:]
    O = (V[..., :h] - V[..., h:]) * _twiddle(h, h, 1.0, V.dtype.type)  # divide by W^k
    E += 1j * O
    E *= 0.5
    return np.ascontiguousarray(_idft(E)).view(real_dtype)  # (re, im) pairs = (v_2j, v_(2j+1))


def _dct_split(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II by Makhoul: v = (x_0, x_2, ..., x_3, x_1), y_k = 2 Re(exp(-i pi k / 2N) V_k)."""
    N = x.shape[-1]
    v = np.concatenate((x[..., 0::2], x[..., 1::2][..., ::-1]), axis=-1)
    V = _real_dft_full(v)
    V *= _twiddle(N, 2 * N, -1.0, V.dtype.type)
    y = V.real * math.sqrt(2.0 / N)
    y[..., 0] *= math.sqrt(0.5)
    return y.astype(x.dtype, copy=False)


def _idct_split(X: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_dct_split`: V_k = exp(i pi k / 2N) (y_k - i y_{N-k}) / 2, v = IDFT(V), unshuffle."""
    N = X.shape[-1]
    cdtype = _cdtype(X.dtype)
    y = X * math.sqrt(N / 2.0)  # = (unnormalized y) / 2
    y[..., 0] *= math.sqrt(2.0)
    V = y.astype(cdtype)
    V.imag[..., 1:] = -y[..., :0:-1]  # -y_{N-k}, y_N = 0
    V *= _twiddle(N, 2 * N, 1.0, cdtype)
    v = _real_idft_full(V, X.dtype)
    half = (N + 1) // 2
    x = np.empty_like(v)
    x[..., 0::2] = v[..., :half]
    x[..., 1::2] = v[..., half:][..., ::-1]
    return x


def _use_split(n: int) -> bool:
    return n >= _SPLIT_MIN_LEN and _largest_prime_factor(n) > _SPLIT_MIN_PRIME


def _dct_common(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    import scipy.fft

    who = "idct" if inverse else "dct"
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() == 0:
        raise CodecError(f"{who}: expected a floating-point tensor with at least 1 dim, got {x!r:.80}")
    if x.shape[-1] < 1:
        raise CodecError(f"{who}: last dimension is empty")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc = x.detach().to("cpu", dtype).numpy()
    if _use_split(x.shape[-1]):
        out = _idct_split(xc) if inverse else _dct_split(xc)
        return torch.from_numpy(out).to(x.device)
    fn = scipy.fft.idct if inverse else scipy.fft.dct
    out = fn(xc, type=2, norm="ortho", axis=-1, workers=_scipy_threads())
    return torch.from_numpy(out).to(x.device)


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension (any length d): ``y = C x``, ``C C^T = I``.

    C[k, j] = s_k cos(pi (2j + 1) k / (2d)), s_0 = sqrt(1/d), s_k = sqrt(2/d) for k >= 1 (= scipy.fft.dct(x,
    norm="ortho")). Lengths with only small prime factors go to scipy.fft; lengths with a prime factor > 101
    (d = 668,426 = 2 * 11 * 23 * 1321) go through Makhoul + a prime-splitting DFT (see above). float16 is computed and returned as
    float32. Not differentiable (detached); tensors on other devices go through the CPU.
    """
    return _dct_common(x, inverse=False)


def idct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-III along the last dimension, the inverse and transpose of :func:`dct`: ``x = C^T y``."""
    return _dct_common(x, inverse=True)
