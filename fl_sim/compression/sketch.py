"""Count Sketch of a vector, the compressor of FetchSGD.

[Charikar-2002]: Charikar, Chen & Farach-Colton (2002), "Finding frequent items in data streams"; used by
[Rothchild-2020], "FetchSGD" (ICML 2020, Algorithm 1; docs/notes.md#fetchsgd), whose reference code is
CommEfficient with the ``csvec`` sketch. [Tang-FIHT] (docs/notes.md#tang-fiht) compare against it as
"Count Sketch + error feedback".

A sketch with r rows and c columns holds, for each row j, the signed sum of the coordinates that hash
to each bucket. Tables are linear in x, so sketches of different clients (and rounds) add up.

Kernels are Numba loops (``parallel=True`` over rows for the scatter, over coordinate chunks for the
gather): the scatter of r*d signed values into an r x c table is memory bound, and a plain loop
writes each value once where ``torch.index_add_`` / ``bincount`` first materialise the (r, d) product
and an int64 copy of the indices (measured 0.07 s against 0.23-0.26 s for r = 5, c = 500,000,
d = 6,570,000 on two cores). The median of r values per coordinate is an insertion sort on a small
buffer per chunk (``torch.median`` over the gathered (r, d) tensor took 1.1 s).
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch

from fl_sim.rng import torch_generator
from fl_sim.compression.base import CodecError

__all__ = ["CountSketch", "topk_abs"]

# Numba's default threading layer here is OpenMP (its own libgomp beside torch's): after one parallel
# kernel, the OpenMP worker threads keep spinning and torch's next training step in the same process
# ran 3-11x slower (CifarNet batch 32: 73 ms -> 250 ms with 2 threads, -> 800 ms with OMP_NUM_THREADS=1,
# the setting of a 1-CPU Ray actor), so FetchSGD clients took 700 ms a step. The "workqueue" layer
# parks its threads between kernels: training stays at 70 ms and the sketch is as fast (8 ms at
# d = 1,068,298, r = 5). Chosen only if nothing launched a parallel kernel yet and the user did not
# pick a layer (NUMBA_THREADING_LAYER).
if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"


@numba.njit(parallel=True, cache=True)
def _sketch_rows(x, h, s, cols):  # pragma: no cover - compiled
    """table[b, j, h[j, i]] += s[j, i] * x[b, i] for x of shape (B, d)."""
    n_vec, d = x.shape
    rows = h.shape[0]
    table = np.zeros((n_vec, rows, cols), dtype=np.float32)
    for job in numba.prange(n_vec * rows):
        b = job // rows
        j = job % rows
        for i in range(d):
            table[b, j, h[j, i]] += s[j, i] * x[b, i]
    return table


@numba.njit(parallel=True, cache=True)
def _estimate(table, h, s, chunk):  # pragma: no cover - compiled
    """est[i] = median_j s[j, i] * table[j, h[j, i]] (mean of the two middle values for even r)."""
    rows, d = h.shape
    out = np.empty(d, dtype=np.float32)
    n_chunks = (d + chunk - 1) // chunk
    for ch in numba.prange(n_chunks):
        buf = np.empty(rows, dtype=np.float32)
        stop = min(d, (ch + 1) * chunk)
        for i in range(ch * chunk, stop):
            for j in range(rows):  # insertion sort of the r row estimates
                v = s[j, i] * table[j, h[j, i]]
                k = j
                while k > 0 and buf[k - 1] > v:
                    buf[k] = buf[k - 1]
                    k -= 1
                buf[k] = v
            if rows % 2 == 1:
                out[i] = buf[rows // 2]
            else:
                out[i] = 0.5 * (buf[rows // 2 - 1] + buf[rows // 2])
    return out


@numba.njit(parallel=True, cache=True)
def _estimate5(table, h, s, chunk):  # pragma: no cover - compiled
    """The r = 5 case of ``_estimate`` with a branch-free median of five (3x faster).

    Sort the pairs (a, b) and (c, e); the smaller of the two pair minima is below three others and
    the larger of the two pair maxima above three others, so neither is the median: the median of
    five is the median of the remaining three (the other minimum, the other maximum, f).
    """
    d = h.shape[1]
    out = np.empty(d, dtype=np.float32)
    n_chunks = (d + chunk - 1) // chunk
    for ch in numba.prange(n_chunks):
        for i in range(ch * chunk, min(d, (ch + 1) * chunk)):
            a = s[0, i] * table[0, h[0, i]]
            b = s[1, i] * table[1, h[1, i]]
            c = s[2, i] * table[2, h[2, i]]
            e = s[3, i] * table[3, h[3, i]]
            f = s[4, i] * table[4, h[4, i]]
            m1 = max(min(a, b), min(c, e))
            m2 = min(max(a, b), max(c, e))
            out[i] = max(min(m1, m2), min(max(m1, m2), f))
    return out


@numba.njit(cache=True)
def _zero_buckets(table, h, idx):  # pragma: no cover - compiled
    rows = h.shape[0]
    for t in range(idx.shape[0]):
        i = idx[t]
        for j in range(rows):
            table[j, h[j, i]] = 0.0


def _topk_of(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of ``a`` (1-D, >= 0), unsorted: the set ``torch.topk(a, k)`` over the
    whole vector returns, ties included.

    ``torch.topk`` over millions of entries is a full selection (0.2 s for d = 6.57M, k = 50,000).
    Here a strided sample of ``a`` gives a threshold a little below the k-th largest value, a single
    pass keeps the entries above it, and ``torch.topk`` runs on those candidates only. That is the full
    selection's set unless entries equal to the k-th largest value t lie both inside and outside it (an
    exact tie across the boundary), where the two break the tie differently: then, and when fewer than
    k entries pass (an adversarial layout), the full ``torch.topk`` runs instead.
    """
    d = a.numel()
    if k >= d:
        return torch.arange(d)
    if d < 200_000 or k > d // 8:
        return torch.topk(a, k, sorted=False).indices
    stride = max(1, d // 65_536)
    sample = a[::stride]
    n = sample.numel()
    # expected number of sampled entries above the k-th largest: n*k/d; keep ~3x that plus a margin
    rank = min(n - 1, int(3.0 * n * k / d) + 64)
    thr = torch.topk(sample, rank + 1, sorted=True).values[-1]
    cand = torch.nonzero(a >= thr).squeeze(1)
    if cand.numel() < k:
        return torch.topk(a, k, sorted=False).indices
    picked = cand[torch.topk(a[cand], k, sorted=False).indices]
    t = a[picked].min()
    if int((a[cand] == t).sum()) != int((a[picked] == t).sum()):  # a tie at t straddles the boundary
        return torch.topk(a, k, sorted=False).indices
    return picked


def topk_abs(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k entries of largest |v| (1-D ``v``), unsorted; exact, with the ties of
    ``torch.topk(v.abs(), k)`` on the whole vector (:func:`_topk_of`).

    FetchSGD's code ([Rothchild-2020]) selects with ``torch.topk(v**2, k, sorted=False)`` (csvec ``_findHHK``, CommEfficient
    ``_topk``). ``torch.topk`` on CPU is comparison-based, and |a| < |b| exactly when a^2 < b^2 while the
    float32 squares neither underflow nor overflow (1e-19 < |v| < 1e19; distinct normal |v| have distinct
    squares), so the two select the same set, ties included (tests/test_sketch.py). Outside that range the
    authors' squares merge values (a 1e-30 estimate squares to 0, tied with every zero); |v| keeps them apart.
    """
    return _topk_of(v.abs(), k)


class CountSketch:
    """Count Sketch S(x) in R^{r x c} of x in R^d (Charikar et al. 2002; FetchSGD's ``csvec``).

    Row j in [0, r) has a bucket hash h_j : [d] -> [c] and a sign hash s_j : [d] -> {-1, +1}, drawn
    i.i.d. uniform from ``seed`` (the same seed gives the same hashes on every machine):

        S(x)[j, b] = sum_{i : h_j(i) = b} s_j(i) x_i                        (sketch, linear in x)
        x_hat_i    = median_{j < r} s_j(i) S[j, h_j(i)]                      (estimate of x_i)
        U_k(S)     = x_hat restricted to the k coordinates of largest |x_hat_i|   (top-k unsketch)

    Symbols: d vector length, r = ``rows``, c = ``cols``, k heavy hitters kept. For r odd the median
    is the middle value; for r even, the mean of the two middle values.

    Hashes are stored once as int32 buckets ``h`` (r, d) and int8 signs ``s`` (r, d): 5 bytes per
    coordinate and row.

    Args:
        d: vector length (>= 1).
        rows: r >= 1.
        cols: c >= 1.
        seed: int seed; hashes come from ``torch_generator(seed, "count_sketch", r, c, d)``.
    """

    def __init__(self, d: int, rows: int, cols: int, *, seed: int) -> None:
        for name, val in (("d", d), ("rows", rows), ("cols", cols)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise CodecError(f"CountSketch: {name} must be a positive int, got {val!r}")
        if cols >= 2**30:
            raise CodecError(f"CountSketch: cols={cols} too large; use cols < 2**30")
        if not isinstance(seed, int):
            raise CodecError(f"CountSketch: seed must be an int, got {type(seed).__name__}")
        self.d, self.rows, self.cols, self.seed = d, rows, cols, seed
        g = torch_generator(seed, "count_sketch", rows, cols, d)
        # One draw per (row, coordinate) in [0, 2c): bucket = draw // 2, sign bit = draw % 2
        # (independent and uniform, since 2c is even).
        draw = torch.randint(0, 2 * cols, (rows, d), generator=g, dtype=torch.int32)
        self.h = torch.div(draw, 2, rounding_mode="floor")  # int32 (r, d)
        self.s = ((draw % 2) * 2 - 1).to(torch.int8)  # int8 (r, d), +-1
        self._h_np = self.h.numpy()
        self._s_np = self.s.numpy()

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of a table."""
        return (self.rows, self.cols)

    # -- sketching ------------------------------------------------------------------------------
    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """S(x): float32 table (rows, cols) for x of shape (d,), or (C, rows, cols) for x (C, d)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or x.shape[-1] != self.d:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CodecError(f"CountSketch.sketch: expected shape (d,) or (C, d) with d={self.d}, got {shape}")
        if not torch.is_floating_point(x):
            raise CodecError(f"CountSketch.sketch: expected a floating-point tensor, got {x.dtype}")
        xb = x.detach().to(torch.float32).reshape(-1, self.d).contiguous()
        table = torch.from_numpy(_sketch_rows(xb.numpy(), self._h_np, self._s_np, self.cols))
        return table[0] if x.dim() == 1 else table

    def estimate(self, table: torch.Tensor) -> torch.Tensor:
        """x_hat (d,) float32: median over rows of s_j(i) * table[j, h_j(i)]."""
        t = self._check_table(table, "estimate")
        chunk = max(4096, self.d // 64)
        kernel = _estimate5 if self.rows == 5 else _estimate
        return torch.from_numpy(kernel(t.numpy(), self._h_np, self._s_np, chunk))

    def unsketch_topk(self, table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, idx): ``values`` (d,) float32 holds x_hat on the k coordinates of largest |x_hat|
        and zeros elsewhere; ``idx`` (k,) int64 lists those coordinates (FetchSGD: estimate all
        coordinates, keep the top k)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.d:
            raise CodecError(f"CountSketch.unsketch_topk: k must be an int in [1, d={self.d}], got {k!r}")
        est = self.estimate(table)
        idx = topk_abs(est, k)  # FetchSGD's selection and ties (csvec: topk of est**2; see topk_abs)
        values = torch.zeros(self.d, dtype=torch.float32)
        values[idx] = est[idx]
        return values, idx

    def zero_coordinates(self, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Zero, in place, every bucket table[j, h_j(i)] hit by a coordinate i in ``idx``; returns table.

        This is the FetchSGD reference behaviour (csvec: "zero out the sketch buckets of nz(Delta)"),
        not a subtraction: buckets shared with coordinates outside ``idx`` are cleared too. For the
        exact linear removal of an applied vector Delta use ``table -= sketch(Delta)`` instead.
        """
        t = self._check_table(table, "zero_coordinates", writable=True)
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or torch.is_floating_point(idx):
            raise CodecError("CountSketch.zero_coordinates: idx must be a 1-D integer tensor of coordinates")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d):
            raise CodecError(f"CountSketch.zero_coordinates: idx must lie in [0, {self.d})")
        _zero_buckets(t.numpy(), self._h_np, idx.to(torch.int64).contiguous().numpy())
        return table

    # -- helpers --------------------------------------------------------------------------------
    def _check_table(self, table: torch.Tensor, who: str, writable: bool = False) -> torch.Tensor:
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != self.shape:
            shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise CodecError(f"CountSketch.{who}: expected a table of shape {self.shape}, got {shape}")
        if writable:
            if table.dtype != torch.float32 or not table.is_contiguous() or table.device.type != "cpu":
                raise CodecError(f"CountSketch.{who}: table must be a contiguous float32 CPU tensor to edit in place")
            return table
        return table.detach().to("cpu", torch.float32).contiguous()

    def __repr__(self) -> str:
        return f"CountSketch(d={self.d}, rows={self.rows}, cols={self.cols}, seed={self.seed})"
