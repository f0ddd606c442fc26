"""Fast orthogonal transforms: Walsh-Hadamard (fwht) and orthonormal DCT-II / DCT-III (dct, idct).

Papers (shared/papers, see papers/NOTES.md):
  * Abdi thesis Ch. 4 eq. (4.1)-(4.2): ``v = (1/sqrt(k)) H (r * g)`` needs ``H g`` for the n x n Sylvester Hadamard
    matrix H_n (entries +-1), computed here in O(n log n) by :func:`fwht`; Ch. 5 eq. (5.3) uses the same transform.
  * Tang et al. (slides, Sec. 4(a)): the sensing matrix is Q random rows of the d x d orthonormal DCT or WHT;
    :func:`dct` / :func:`idct` are that DCT and its inverse (= transpose).

``fwht(x)`` equals ``scipy.linalg.hadamard(n) @ x`` along the last dimension (natural / Sylvester order,
unnormalized: ``fwht(fwht(x)) = n x``).
"""

from __future__ import annotations

import torch

from .base import CodecError

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


def fwht(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dimension: ``y = H_n x``.

    H_n is the n x n Sylvester Hadamard matrix (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]), n a power of 2.
    Batched over leading dimensions. float32 and float64 are computed in their own precision; float16 /
    bfloat16 are computed in float32 and returned as float32.

    Args:
        x: tensor of shape (..., n), n a power of 2.
        inplace: overwrite ``x`` (must be float32/float64) and return it.
    """
    _check_fwht_input(x)
    if inplace and x.dtype not in (torch.float32, torch.float64):
        raise CodecError(f"fwht: inplace=True needs a float32/float64 tensor, got {x.dtype}; use inplace=False")
    src = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    y = _fwht_torch(src)
    if inplace:
        with torch.no_grad():
            x.copy_(y)
        return x
    return y


def _scipy_threads() -> int:
    return max(1, torch.get_num_threads())


def _dct_common(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    import scipy.fft

    who = "idct" if inverse else "dct"
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() == 0:
        raise CodecError(f"{who}: expected a floating-point tensor with at least 1 dim")
    if x.shape[-1] < 1:
        raise CodecError(f"{who}: last dimension is empty")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    arr = x.detach().to("cpu", dtype).numpy()
    fn = scipy.fft.idct if inverse else scipy.fft.dct
    out = fn(arr, type=2, norm="ortho", axis=-1, workers=_scipy_threads())
    return torch.from_numpy(out).to(x.device)


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last dimension (any length d): ``y = C x``, ``C C^T = I``.

    C[k, j] = s_k cos(pi (2j + 1) k / (2d)), s_0 = sqrt(1/d), s_k = sqrt(2/d) for k >= 1. Computed by
    scipy.fft (pocketfft; arbitrary lengths via Bluestein). float16 is computed and returned as float32.
    Not differentiable (detached); tensors on other devices go through the CPU.
    """
    return _dct_common(x, inverse=False)


def idct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-III along the last dimension, the inverse and transpose of :func:`dct`: ``x = C^T y``."""
    return _dct_common(x, inverse=True)
