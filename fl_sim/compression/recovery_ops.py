"""Faster evaluations of Tang et al.'s subsampled DCT / WHT for the recovery loops (same matrix, leaner arithmetic).

Phi = sqrt(n/Q) S B D (:class:`~fl_sim.compression.projections.SubsampledOrthogonal`: S picks Q rows, B is the
orthonormal DCT-II or the n x n WHT / sqrt(n), D optional signs). FIHT (``recovery.fiht``) spends about 90 % of its
time in Phi and Phi^T, so they are evaluated here on NumPy arrays:

* DCT with even d: a *row-pruned Makhoul* transform (Makhoul 1980). With v = (x_0, x_2, ..., x_3, x_1),
  z_j = v_2j + i v_2j+1 (h = d/2 complex values) and Z = DFT_h(z):

      y_k = Re(P_k Z_{k mod h} + R_k conj(Z_{(h - k mod h) mod h})),   k in rows,

  with P_k = c_k (1/2 + B_k), R_k = c_k (1/2 - B_k), B_k = +-(-i/2) W^{k mod h} (+ for k < h), W = e^{-2 pi i/d},
  c_k = sqrt(d/Q) s_k e^{-i pi k/2d} (s_0 = sqrt(1/d), s_k = sqrt(2/d)). The adjoint is its exact transpose:
  G = scatter(conj(y P) at k mod h) + scatter(y R at (h - k mod h) mod h), z = DFT_h^H G, v = real view of z,
  x = unpermute(v). Only the Q selected outputs are formed, so one forward is a gather of d values, one
  length-h complex DFT (``transforms._dft``: prime factors split off, d = 668,426 = 2*11*23*1321) and O(Q)
  work; the full DCT would also build all d outputs (roll, conj, two twiddle passes, real part, concatenate).
* DCT with odd d: :func:`~fl_sim.compression.transforms.dct` / ``idct`` and a gather / scatter.
* WHT: the numba :func:`~fl_sim.compression.transforms.fwht` in place on a zero-padded length-n buffer.

Why not the torch operator: its gather/scatter and scaling run as torch ops whose OpenMP regions stall on a
loaded 2-core machine (7-16 ms per forward at d = 668,426 against about 6 ms here); NumPy element-wise work is
single-threaded and predictable.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from fl_sim.compression.base import LinearOperator

__all__ = ["fast_operator", "array_calls"]


class _FastSubsampled(LinearOperator):
    """The operator of a ``SubsampledOrthogonal`` (same rows, signs and scale) evaluated in NumPy (module doc).

    ``forward_np`` / ``adjoint_np`` take and return NumPy arrays (batched over leading dims); ``forward`` /
    ``adjoint`` wrap them for tensors.
    """

    def __init__(self, op: LinearOperator, dtype: torch.dtype) -> None:
        # no reference to ``op`` itself: fast_operator caches this object in a WeakKeyDictionary keyed by op
        self.m, self.d, self.n = op.m, op.d, op.n
        self.transform = op.transform
        self.np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.rows = op.rows.to(torch.int64).numpy()
        self.scale = math.sqrt(op.n / op.q) * (1.0 if op.transform == "dct" else 1.0 / math.sqrt(op.n))
        self.signs = op.signs.numpy().astype(self.np_dtype) if op.use_signs else None
        self.pruned = op.transform == "dct" and op.d % 2 == 0
        if self.pruned:
            self._init_pruned()

    def _init_pruned(self) -> None:
        N, h = self.d, self.d // 2
        k = self.rows.astype(np.int64)
        kp = k % h
        sign = np.where(k < h, 1.0, -1.0)
        s = np.where(k == 0, math.sqrt(1.0 / N), math.sqrt(2.0 / N))
        c = self.scale * s * np.exp(-1j * math.pi * k / (2 * N))
        b = sign * (-0.5j) * np.exp(-2j * math.pi * kp / N)
        cdtype = np.complex128 if self.np_dtype == np.float64 else np.complex64
        self.kp, self.kc, self.h = kp, (h - kp) % h, h
        self.P = (c * (0.5 + b)).astype(cdtype)
        self.R = (c * (0.5 - b)).astype(cdtype)
        self.cdtype = cdtype
        # Adjoint scatter: entry e of (kp, kc) adds conj(G-weight) at index idx[e]; an index can be hit up to 4
        # times (by k, k + h, h - k, 2h - k), so entries are split into layers with distinct indices, and each
        # layer is one fancy-index add (np.add.at would be ~10x slower; bincount returns float64 arrays of size h).
        idx = np.concatenate((kp, self.kc))
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        first = np.searchsorted(sorted_idx, sorted_idx, side="left")
        rank = np.empty_like(order)
        rank[order] = np.arange(idx.size) - first  # occurrence number of each entry's index
        self.layers = [np.flatnonzero(rank == r) for r in range(int(rank.max()) + 1)]
        self.scatter_idx = idx
        # conj(G) = scatter(y P at kp) + scatter(y conj(R) at kc): building conj(G) saves a pass
        self.coef_conj_g = np.concatenate((self.P, self.R.conj()))

    def _np(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float64 if self.np_dtype == np.float64 else torch.float32).numpy()

    # -------------------------------------------------------------------------------------------- forward
    def forward_np(self, x: np.ndarray) -> np.ndarray:
        """(..., d) array -> (..., Q): sqrt(n/Q) [B (D x)]_rows."""
        from fl_sim.compression.transforms import _dft, dct, fwht

        x = x.astype(self.np_dtype, copy=False)
        if self.signs is not None:
            x = x * self.signs
        if self.pruned:
            v = np.concatenate((x[..., 0::2], x[..., 1::2][..., ::-1]), axis=-1)
            Z = _dft(v.view(self.cdtype))
            return (self.P * Z[..., self.kp] + self.R * Z[..., self.kc].conj()).real.astype(self.np_dtype)
        if self.transform == "dct":
            z = dct(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        else:
            z = np.zeros((*x.shape[:-1], self.n), dtype=x.dtype)
            z[..., : self.d] = x
            fwht(torch.from_numpy(z), inplace=True)
        out = z[..., self.rows]
        out *= self.scale
        return out

    # -------------------------------------------------------------------------------------------- adjoint
    def _adjoint_pruned_1d(self, y: np.ndarray) -> np.ndarray:
        from fl_sim.compression.transforms import _dft

        w = self.coef_conj_g * np.concatenate((y, y))
        cg = np.zeros(self.h, dtype=self.cdtype)  # conj(G)
        for layer in self.layers:
            cg[self.scatter_idx[layer]] += w[layer]
        # z = DFT_h^H G = conj(DFT_h(conj G)); v = real view of z = (v_0, v_1, ...), then unpermute
        z = _dft(cg)
        np.conjugate(z, out=z)
        v = z.view(self.np_dtype)
        x = np.empty(self.d, dtype=self.np_dtype)
        x[0::2] = v[: self.h]
        x[1::2] = v[self.h :][::-1]
        return x

    def adjoint_np(self, y: np.ndarray) -> np.ndarray:
        """(..., Q) array -> (..., d): sqrt(n/Q) D B^T S^T y."""
        from fl_sim.compression.transforms import fwht, idct

        y = y.astype(self.np_dtype, copy=False)
        if self.pruned:
            flat = y.reshape(-1, self.m)
            x = np.stack([self._adjoint_pruned_1d(row) for row in flat]).reshape(*y.shape[:-1], self.d)
        else:
            z = np.zeros((*y.shape[:-1], self.n), dtype=y.dtype)
            z[..., self.rows] = y * self.scale
            if self.transform == "dct":
                x = idct(torch.from_numpy(z)).numpy()
            else:
                fwht(torch.from_numpy(z), inplace=True)
                x = np.ascontiguousarray(z[..., : self.d])
        return x * self.signs if self.signs is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.forward_np(self._np(x)))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.adjoint_np(self._np(y)))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_operator(op: LinearOperator, dtype: torch.dtype = torch.float32) -> LinearOperator:
    """``op`` itself, or an equivalent faster evaluation of it where one exists (subsampled DCT / WHT).

    The returned operator is the same matrix (tested against ``op``); only the arithmetic differs. It is cached
    per (op, dtype) for as long as ``op`` lives (building the pruned DCT's tables takes ~10 ms at d = 668,426, a
    third of an FIHT iteration; operators are not mutated after construction).
    """
    from fl_sim.compression.projections import SubsampledOrthogonal

    if not (isinstance(op, SubsampledOrthogonal) and op.d >= 2):
        return op
    per_op = _CACHE.setdefault(op, {})
    if dtype not in per_op:
        per_op[dtype] = _FastSubsampled(op, dtype)
    return per_op[dtype]


def array_calls(A: LinearOperator, np_dtype) -> tuple:
    """(forward, adjoint) on NumPy arrays of ``np_dtype`` for any LinearOperator (zero-copy for CPU tensors)."""
    if isinstance(A, _FastSubsampled):
        return A.forward_np, A.adjoint_np
    tdtype = torch.float64 if np.dtype(np_dtype) == np.float64 else torch.float32

    def fwd(v: np.ndarray) -> np.ndarray:
        return A.forward(torch.from_numpy(v)).detach().to("cpu", tdtype).numpy()

    def adj(r: np.ndarray) -> np.ndarray:
        return A.adjoint(torch.from_numpy(r)).detach().to("cpu", tdtype).numpy()

    return fwd, adj
