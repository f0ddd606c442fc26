"""Structured random projections built from a seed: partial Hadamard, subsampled DCT/WHT, dense Gaussian.

Papers (keys of docs/references.md; equations and errata in docs/notes.md):
  * [Abdi-thesis] Ch. 4 eq. (4.1): ``T = (1/sqrt(k)) H R`` (QCS), Lemma 6 eq. (4.3): ``T T^T = (n/k) I``,
    ``E[T^T T] = I``; applied blockwise to partitions of the gradient (Ch. 4 experiments). Ch. 5 eq. (5.3):
    the RLC encoder ``A = (1/sqrt(m)) H R`` is the same operator with k = m.
  * [Tang-FIHT] (slides; docs/notes.md#tang-fiht): ``Phi = sqrt(d/Q) Phi~``, Phi~ = Q random rows of the orthonormal
    d x d DCT or WHT; ``Phi Phi^T = (d/Q) I``, ``E[Phi^T Phi] = I``.
  * [Mitra-Khisti-2020]: a dense i.i.d. Gaussian sensing matrix, entries N(0, 1/m).

Every operator is rebuilt from ``seed`` in O(d) memory (index and sign tensors, never a dense matrix, except
:class:`GaussianOperator`), and its forward / adjoint are batched over leading dims: (C, d) -> (C, m) encodes
the C clients of a round in one call. Inputs are float32 (float64 kept, float16 promoted); NaN/inf are not
scanned for here (codecs validate with ``check_vector`` before projecting; the operators sit in recovery loops).
"""

from __future__ import annotations

import math

import torch

from fl_sim.rng import torch_generator
from fl_sim.compression.base import CodecError, LinearOperator, check_seed
from fl_sim.compression.transforms import dct, fwht, idct, next_pow2

__all__ = ["PartialHadamard", "BlockwiseOperator", "SubsampledOrthogonal", "GaussianOperator", "stacked_forward",
           "stacked_adjoint"]

_MAX_DENSE_ENTRIES = 1 << 26


def _check_pos_int(name: str, value: object, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodecError(f"{who}: {name} must be a positive int, got {value!r}")
    return value



def _rademacher(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` i.i.d. +-1 values (float32), each with probability 1/2."""
    return torch.randint(0, 2, (count,), generator=gen, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)


def _row_subsets(blocks: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(blocks, k) int64: per block, k distinct indices of range(n), a uniform random k-subset, sorted.

    One block with k <= n/4: draw ~1.5k i.i.d. uniform indices, keep the distinct ones (by symmetry a uniform
    random subset given its size), top up if short, then keep a uniform k of them: O(k log k) instead of a
    randperm of n (2 ms vs 28-44 ms at n = 2^20, k = n/32). Otherwise the k largest of i.i.d. uniform keys
    per block (topk: 11 ms vs argsort 21 ms for 2612 blocks of 256).
    """
    if blocks == 1 and 4 * k <= n:
        draws = k + k // 2 + 16
        pool = torch.randint(0, n, (draws,), generator=gen).unique()
        while pool.numel() < k:
            pool = torch.cat((pool, torch.randint(0, n, (draws,), generator=gen))).unique()
        rows = pool[torch.randperm(pool.numel(), generator=gen)[:k]].unsqueeze(0)
    else:
        rows = torch.rand(blocks, n, generator=gen).topk(k, dim=1, sorted=False).indices
    return rows.sort(dim=1).values


def _signed_padded(x: torch.Tensor, signs: torch.Tensor | None, length: int) -> torch.Tensor:
    """A fresh contiguous (..., length) tensor holding ``signs * x`` then zeros (safe to transform in place)."""
    z = x.new_zeros(*x.shape[:-1], length)
    z[..., : x.shape[-1]] = x * signs.to(x.device, x.dtype) if signs is not None else x
    return z


class _ProjectionBase(LinearOperator):
    """Shared input checks: last dim must match, floating dtype; float32 unless float64 is given."""

    def _check(self, x: torch.Tensor, length: int, what: str) -> torch.Tensor:
        who = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"{who}.{what}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != length:
            raise CodecError(
                f"{who}.{what}: expected shape (..., {length}), got {tuple(x.shape)}; "
                f"the operator is ({self.m} x {self.d})"
            )
        if not torch.is_floating_point(x):
            raise CodecError(f"{who}.{what}: expected a floating-point tensor, got {x.dtype}")
        return x if x.dtype == torch.float64 else x.to(torch.float32)


class PartialHadamard(_ProjectionBase):
    """Partial Hadamard projection ([Abdi-thesis] Ch. 4 eq. 4.1; Ch. 5 eq. 5.3 with k = m), optionally blockwise.

    Per block b of length n (x zero-padded to B*n and cut into B blocks x_b):

        y_b = T_b x_b,   T_b = (1/sqrt(k)) S_b H_n R_b

    * H_n: n x n Sylvester Hadamard matrix, entries +-1 (``fwht``);
    * R_b = diag(r_b), r_b i.i.d. Rademacher signs (all ones when ``signs=False``);
    * S_b: selects k rows of H_n, a uniform random subset without replacement (``rows="random"``, sorted) or
      rows 0..k-1 (``rows="first"``);
    * n = ``block``, or next_pow2(max(d, k)) with one block when ``block=None``; B = ceil(d / n).

    Output y = (y_1, ..., y_B), m = B*k. Lemma 6 (4.3): T_b T_b^T = (n/k) I_k (exact when d is a multiple of n;
    a block cut by the zero padding keeps only its first columns) and E[T^T T] = I_d.
    All blocks are transformed in one batched fwht call. Randomness: signs and rows from ``seed``.

    Attributes:
        rows: (B, k) int64 row indices per block. signs: (d,) float32 +-1 (ones if signs=False).
        n, blocks, k, m, d.
    """

    def __init__(
        self, d: int, k: int, *, seed: int, block: int | None = None, signs: bool = True, rows: str = "random"
    ) -> None:
        who = type(self).__name__
        self.d = _check_pos_int("d", d, who)
        self.k = _check_pos_int("k", k, who)
        seed = check_seed(seed, who)
        if rows not in ("random", "first"):
            raise CodecError(f"{who}: rows must be 'random' or 'first', got {rows!r}")
        if block is None:
            self.n = next_pow2(max(d, k))
        else:
            block = _check_pos_int("block", block, who)
            if block & (block - 1):
                raise CodecError(f"{who}: block must be a power of 2, got {block}; try {next_pow2(block)}")
            self.n = block
        if self.k > self.n:
            raise CodecError(f"{who}: k={k} exceeds the block length n={self.n}; use k <= n or a larger block")
        self.blocks = -(-d // self.n)
        self.m = self.blocks * self.k
        self.seed, self.block, self.use_signs, self.row_mode = seed, block, bool(signs), rows
        self.signs = (
            _rademacher(d, torch_generator(seed, "partial_hadamard", "signs"))
            if signs
            else torch.ones(d, dtype=torch.float32)
        )
        if rows == "random":
            self.rows = _row_subsets(self.blocks, self.n, self.k, torch_generator(seed, "partial_hadamard", "rows"))
        else:
            self.rows = torch.arange(self.k).expand(self.blocks, self.k).contiguous()
        # Flat indices into the padded (B*n) layout, so gather/scatter is one index op over all blocks.
        self._flat = (self.rows + self.n * torch.arange(self.blocks).unsqueeze(1)).reshape(-1)
        self._scale = 1.0 / math.sqrt(self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., B*k): y_b = (1/sqrt(k)) [H_n (r_b * x_b)]_{rows_b}."""
        x = self._check(x, self.d, "forward")
        lead = x.shape[:-1]
        z = _signed_padded(x, self.signs if self.use_signs else None, self.blocks * self.n)
        z = fwht(z.view(*lead, self.blocks, self.n), inplace=not z.requires_grad)
        y = z.reshape(*lead, self.blocks * self.n).index_select(-1, self._flat.to(x.device))
        return y.mul_(self._scale) if not y.requires_grad else y * self._scale

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(..., B*k) -> (..., d): x_b = (1/sqrt(k)) r_b * (H_n S_b^T y_b), padding dropped."""
        y = self._check(y, self.m, "adjoint")
        lead = y.shape[:-1]
        z = y.new_zeros(*lead, self.blocks * self.n)
        z = z.index_copy(-1, self._flat.to(y.device), y)
        z = fwht(z.reshape(*lead, self.blocks, self.n), inplace=not z.requires_grad)
        x = z.reshape(*lead, self.blocks * self.n)[..., : self.d] * self._scale
        return x * self.signs.to(x.device) if self.use_signs else x.contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.d}, k={self.k}, seed={self.seed}, block={self.block}, "
            f"signs={self.use_signs}, rows={self.row_mode!r})"
        )


def _check_stack(ops: "list[PartialHadamard]", rows: int, who: str) -> None:
    if not ops or len(ops) != rows:
        raise CodecError(f"{who}: {len(ops)} operators for {rows} rows")
    first = ops[0]
    if any((op.d, op.k, op.n, op.blocks, op.use_signs) != (first.d, first.k, first.n, first.blocks, first.use_signs)
           for op in ops):
        raise CodecError(f"{who}: the operators must have one shape (d, k, block, signs); only their seeds may differ")


def stacked_forward(ops: "list[PartialHadamard]", x: torch.Tensor) -> torch.Tensor:
    """(C, d) -> (C, B*k): row i is ``ops[i].forward(x[i])``, each client's own T_i, one fwht for all rows.

    The operators differ only in their randomness (signs, row subsets); the arithmetic per row is that of
    :meth:`PartialHadamard.forward` (same products, the same butterflies per block), so each row is bitwise
    that operator's forward of the row alone.
    """
    _check_stack(ops, x.shape[0], "stacked_forward")
    op = ops[0]
    x = op._check(x, op.d, "forward")
    z = x.new_zeros(x.shape[0], op.blocks * op.n)
    signs = torch.stack([o.signs for o in ops]).to(x.device, x.dtype) if op.use_signs else None
    z[:, : op.d] = x * signs if signs is not None else x
    z = fwht(z.view(x.shape[0], op.blocks, op.n), inplace=True)
    flat = torch.stack([o._flat for o in ops]).to(x.device)
    return z.reshape(x.shape[0], op.blocks * op.n).gather(-1, flat).mul_(op._scale)


def stacked_adjoint(ops: "list[PartialHadamard]", y: torch.Tensor) -> torch.Tensor:
    """(C, B*k) -> (C, d): row i is ``ops[i].adjoint(y[i])`` (see :func:`stacked_forward`)."""
    _check_stack(ops, y.shape[0], "stacked_adjoint")
    op = ops[0]
    y = op._check(y, op.m, "adjoint")
    C = y.shape[0]
    flat = torch.stack([o._flat for o in ops]).to(y.device)
    z = y.new_zeros(C, op.blocks * op.n).scatter_(-1, flat, y)  # distinct indices per row: index_copy's result
    z = fwht(z.view(C, op.blocks, op.n), inplace=True)
    x = z.reshape(C, op.blocks * op.n)[:, : op.d] * op._scale
    return x * torch.stack([o.signs for o in ops]).to(x.device) if op.use_signs else x.contiguous()


class BlockwiseOperator(PartialHadamard):
    """Abdi's partitioned QCS transform: :class:`PartialHadamard` with a mandatory power-of-2 ``block``.

    x is zero-padded to B*n, cut into B blocks of n = ``block``; block b is projected by its own
    T_b = (1/sqrt(k)) S_b H_n R_b (eq. 4.1), m = B*k.
    """

    def __init__(self, d: int, k: int, *, seed: int, block: int, signs: bool = True, rows: str = "random") -> None:
        if block is None:
            raise CodecError("BlockwiseOperator: block is required (a power of 2, e.g. 256); use PartialHadamard")
        super().__init__(d, k, seed=seed, block=block, signs=signs, rows=rows)


class SubsampledOrthogonal(_ProjectionBase):
    """Tang et al.'s sensing matrix: Q random rows of an orthonormal transform, rescaled.

        Phi = sqrt(n/Q) S B D,   forward y = Phi x,  adjoint x = Phi^T y

    * ``transform="dct"``: B = orthonormal d x d DCT-II (``dct``), n = d;
    * ``transform="wht"``: B = H_n / sqrt(n), n = next_pow2(d), x zero-padded to n (Phi is Q x d: the
      first d columns);
    * S: Q distinct rows of range(n), uniform without replacement, sorted; D = diag(Rademacher signs) if
      ``signs=True`` else I (Tang's matrix).

    Phi Phi^T = (n/Q) I_Q exactly; E[Phi^T Phi] = I_d over the random rows.

    Attributes: rows (Q,) int64, signs (d,) float32 (ones if signs=False), n, q, m = Q, d, transform.
    """

    def __init__(self, d: int, q: int, *, seed: int, transform: str = "dct", signs: bool = False) -> None:
        who = type(self).__name__
        self.d = _check_pos_int("d", d, who)
        self.q = _check_pos_int("q", q, who)
        seed = check_seed(seed, who)
        if transform not in ("dct", "wht"):
            raise CodecError(f"{who}: transform must be 'dct' or 'wht', got {transform!r}")
        self.n = d if transform == "dct" else next_pow2(d)
        if q > self.n:
            raise CodecError(f"{who}: q={q} exceeds n={self.n} rows of the {transform} matrix; use q <= {self.n}")
        self.m = q
        self.seed, self.transform, self.use_signs = seed, transform, bool(signs)
        self.signs = (
            _rademacher(d, torch_generator(seed, "subsampled_orthogonal", "signs"))
            if signs
            else torch.ones(d, dtype=torch.float32)
        )
        self.rows = _row_subsets(1, self.n, q, torch_generator(seed, "subsampled_orthogonal", "rows"))[0]
        # sqrt(n/Q) times the transform's own normalisation (1/sqrt(n) for the unnormalized fwht).
        self._scale = math.sqrt(self.n / q) * (1.0 if transform == "dct" else 1.0 / math.sqrt(self.n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., Q): y = sqrt(n/Q) [B (D x)]_rows."""
        x = self._check(x, self.d, "forward")
        signs = self.signs if self.use_signs else None
        if self.transform == "dct":
            z = dct(x * signs.to(x.device) if signs is not None else x)
        else:
            z = _signed_padded(x, signs, self.n)
            z = fwht(z, inplace=not z.requires_grad)
        return z.index_select(-1, self.rows.to(z.device)) * self._scale

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(..., Q) -> (..., d): x = sqrt(n/Q) D B^T S^T y."""
        y = self._check(y, self.m, "adjoint")
        z = y.new_zeros(*y.shape[:-1], self.n).index_copy(-1, self.rows.to(y.device), y)
        if self.transform == "dct":
            z = idct(z)
        else:
            z = fwht(z, inplace=not z.requires_grad)[..., : self.d]
        z = z * self._scale
        return z * self.signs.to(z.device) if self.use_signs else z.contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(d={self.d}, q={self.q}, seed={self.seed}, transform={self.transform!r}, "
            f"signs={self.use_signs})"
        )


class GaussianOperator(_ProjectionBase):
    """Dense Gaussian sensing matrix (Mitra & Khisti): A in R^{m x d}, A_ij i.i.d. N(0, 1/m), so E[A^T A] = I.

    Stored densely (float32), so only for m*d <= 2^26 entries. Attribute: matrix (m, d).
    """

    def __init__(self, d: int, m: int, *, seed: int) -> None:
        who = type(self).__name__
        self.d = _check_pos_int("d", d, who)
        self.m = _check_pos_int("m", m, who)
        self.seed = check_seed(seed, who)
        if m * d > _MAX_DENSE_ENTRIES:
            raise CodecError(
                f"{who}: m*d = {m * d} entries exceeds 2^26; use PartialHadamard or SubsampledOrthogonal for large d"
            )
        gen = torch_generator(self.seed, "gaussian_operator")
        self.matrix = torch.randn(m, d, generator=gen, dtype=torch.float32).div_(math.sqrt(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x, self.d, "forward")
        return x @ self.matrix.to(x.device, x.dtype).T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        y = self._check(y, self.m, "adjoint")
        return y @ self.matrix.to(y.device, y.dtype)

    def dense(self) -> torch.Tensor:
        return self.matrix.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, m={self.m}, seed={self.seed})"
