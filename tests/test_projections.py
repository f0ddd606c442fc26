"""Seeded projections (fl_sim/compression/projections.py): dense references, adjoints, Lemma 6, unbiasedness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from fl_sim.compression.base import CodecError, LinearOperator
from fl_sim.compression.projections import (
    BlockwiseOperator,
    GaussianOperator,
    PartialHadamard,
    SubsampledOrthogonal,
)
from fl_sim.rng import torch_generator

F64 = torch.float64


def _randn(*shape: int, key: str = "x", dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch_generator(1, "test_projections", key, *shape), dtype=dtype)


def _hadamard(n: int) -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64))


def _explicit_partial_hadamard(op: PartialHadamard) -> torch.Tensor:
    """T built entry by entry from (rows, signs): block b rows = (1/sqrt k) H_n[rows_b] diag(r_b), cut to d columns."""
    n, B, k = op.n, op.blocks, op.k
    H = _hadamard(n)
    signs = torch.ones(B * n, dtype=F64)
    signs[: op.d] = op.signs.double()
    T = torch.zeros(B * k, B * n, dtype=F64)
    for b in range(B):
        T[b * k : (b + 1) * k, b * n : (b + 1) * n] = H[op.rows[b]] * signs[b * n : (b + 1) * n] / math.sqrt(k)
    return T[:, : op.d]


def _explicit_subsampled(op: SubsampledOrthogonal) -> torch.Tensor:
    if op.transform == "dct":
        B = torch.from_numpy(scipy.fft.dct(np.eye(op.d), norm="ortho", axis=0))  # B x = dct(x)
    else:
        B = _hadamard(op.n)[:, : op.d] / math.sqrt(op.n)
    return math.sqrt(op.n / op.q) * B[op.rows] * op.signs.double()


OPERATORS = {
    "ph_d1000_k100": lambda: PartialHadamard(1000, 100, seed=1),
    "ph_first_nosign": lambda: PartialHadamard(300, 40, seed=2, signs=False, rows="first"),
    "ph_block64": lambda: PartialHadamard(1000, 16, seed=3, block=64),
    "ph_d_lt_k": lambda: PartialHadamard(5, 8, seed=4),
    "ph_d1": lambda: PartialHadamard(1, 1, seed=5),
    "ph_d1_block4_k3": lambda: PartialHadamard(1, 3, seed=5, block=4),
    "blockwise_odd": lambda: BlockwiseOperator(1001, 8, seed=6, block=32),
    "so_dct": lambda: SubsampledOrthogonal(1000, 70, seed=7),
    "so_dct_signs": lambda: SubsampledOrthogonal(37, 37, seed=8, signs=True),
    "so_wht": lambda: SubsampledOrthogonal(1000, 70, seed=9, transform="wht"),
    "so_wht_signs_d1": lambda: SubsampledOrthogonal(1, 1, seed=9, transform="wht", signs=True),
    "gauss": lambda: GaussianOperator(200, 30, seed=10),
}


# ---------------------------------------------------------------- dense references
@pytest.mark.parametrize("name", [k for k in OPERATORS if not k.startswith(("so_", "gauss"))])
def test_partial_hadamard_dense_equals_explicit_construction(name: str) -> None:
    op = OPERATORS[name]()
    torch.testing.assert_close(op.dense(), _explicit_partial_hadamard(op), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [k for k in OPERATORS if k.startswith("so_")])
def test_subsampled_orthogonal_dense_equals_explicit_construction(name: str) -> None:
    op = OPERATORS[name]()
    torch.testing.assert_close(op.dense(), _explicit_subsampled(op), rtol=0, atol=1e-12)


def test_gaussian_dense_is_its_matrix() -> None:
    op = GaussianOperator(50, 7, seed=3)
    x = _randn(4, 50)
    torch.testing.assert_close(op.forward(x), x @ op.matrix.double().T)
    assert torch.equal(op.dense(), op.matrix)


def test_partial_hadamard_tiny_hand_computed() -> None:
    # d = n = 4, k = 4, rows "first", no signs: T = H_4 / 2.
    op = PartialHadamard(4, 4, seed=0, signs=False, rows="first")
    assert op.forward(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [5.0, -1.0, -2.0, 0.0]


# ---------------------------------------------------------------- adjoint identity, batching
@pytest.mark.parametrize("name", list(OPERATORS))
def test_adjoint_identity(name: str) -> None:
    op: LinearOperator = OPERATORS[name]()
    x, y = _randn(3, op.d, key="ax"), _randn(3, op.m, key="ay")
    lhs = (op.forward(x) * y).sum(-1)
    rhs = (x * op.adjoint(y)).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-9)
    x32, y32 = x.float(), y.float()
    torch.testing.assert_close(
        (op.forward(x32) * y32).sum(-1).double(), (x32 * op.adjoint(y32)).sum(-1).double(), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("name", list(OPERATORS))
def test_batched_forward_equals_row_by_row(name: str) -> None:
    op: LinearOperator = OPERATORS[name]()
    X = _randn(4, op.d, key="batch", dtype=torch.float32)  # (C clients, d) -> (C, m) in one call
    Y = op.forward(X)
    assert Y.shape == (4, op.m) and Y.dtype == torch.float32
    for c in range(4):
        torch.testing.assert_close(Y[c], op.forward(X[c]), rtol=1e-6, atol=1e-5)
    Z = op.adjoint(Y.reshape(2, 2, op.m))  # any leading dims
    assert Z.shape == (2, 2, op.d)


# ---------------------------------------------------------------- Lemma 6 and unbiasedness
@pytest.mark.parametrize(("d", "k", "block"), [(256, 32, None), (512, 16, 128), (64, 64, None)])
def test_lemma6_T_Tt_equals_n_over_k_identity(d: int, k: int, block: int | None) -> None:
    # [Abdi-thesis] eq. (4.3): T T^T = (n/k) I_k per block (d a multiple of n, so no column is cut by padding).
    op = PartialHadamard(d, k, seed=11, block=block)
    T = op.dense()
    torch.testing.assert_close(T @ T.T, (op.n / k) * torch.eye(op.m, dtype=F64), rtol=0, atol=1e-12)


def test_rlc_encoder_rows_are_orthogonal() -> None:
    # [Abdi-thesis] eq. (5.3): A = H R / sqrt(m), H an m x d partial Hadamard with H H^T = d I  =>  A A^T = (d/m) I.
    d, m = 128, 24
    A = PartialHadamard(d, m, seed=12).dense()
    torch.testing.assert_close(A @ A.T, (d / m) * torch.eye(m, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("signs", "rows"), [(True, "random"), (False, "random"), (True, "first")])
def test_partial_hadamard_unbiased_over_seeds(signs: bool, rows: str) -> None:
    # E[T^T T] = I (Lemma 6). Diagonal: (1/k) sum_{l in S} H_li^2 = 1 exactly for every seed.
    # Off-diagonal (i != j): (T^T T)_ij = r_i r_j c, c = (1/k) sum_{l in S} H_{l, i xor j}; column t = i xor j != 0
    # of H has n/2 entries +1 and n/2 entries -1, so for k rows drawn without replacement E[c] = 0 and
    # Var[c] = (1/k) (n - k)/(n - 1) (finite-population correction). With random signs E[(r_i r_j c)^2] is the
    # same. With rows="first" c is fixed: |c| <= 1, so sigma <= 1. The mean of N i.i.d. draws has standard
    # error sigma / sqrt(N); we allow 5 standard errors (over 120 entries: false-alarm probability < 1e-4).
    n, k, N = 16, 4, 800
    sigma = math.sqrt((n - k) / (k * (n - 1))) if rows == "random" else 1.0
    acc = torch.zeros(n, n, dtype=F64)
    for s in range(N):
        T = PartialHadamard(n, k, seed=1000 + s, signs=signs, rows=rows).dense()
        G = T.T @ T
        torch.testing.assert_close(torch.diagonal(G), torch.ones(n, dtype=F64), rtol=0, atol=1e-12)
        acc += G
    mean = acc / N
    off = mean - torch.eye(n, dtype=F64)
    assert off.abs().max().item() <= 5 * sigma / math.sqrt(N)
    assert off.abs().max().item() > 0  # the estimate is genuinely random (the test can fail)


@pytest.mark.parametrize(("transform", "d"), [("dct", 12), ("wht", 16), ("wht", 13)])
def test_subsampled_orthogonal_unbiased_over_seeds(transform: str, d: int) -> None:
    # E[Phi^T Phi] = I: (Phi^T Phi)_ij = (n/Q) sum_{l in S} a_l, a_l = B_li B_lj, S = Q of n rows without
    # replacement. E = (n/Q)(Q/n) sum_l a_l = (B^T B)_ij = delta_ij. Var = (n/Q)^2 Q s^2 (n - Q)/(n - 1) with
    # s^2 = mean_l(a_l^2) - mean_l(a_l)^2 (finite-population variance), computed here per entry from the exact B.
    # Tolerance: 5 standard errors sigma_ij / sqrt(N) (+1e-12 where sigma_ij = 0).
    q, N = 5, 600
    op0 = SubsampledOrthogonal(d, q, seed=0, transform=transform)
    n = op0.n
    B = _explicit_subsampled(SubsampledOrthogonal(d, n, seed=0, transform=transform))  # q = n: all rows, Phi = B
    a = B[:, :, None] * B[:, None, :]  # (n, d, d): a_l for every entry
    s2 = (a**2).mean(0) - a.mean(0) ** 2
    sigma = (n / q) * torch.sqrt(q * s2 * (n - q) / (n - 1))
    acc = torch.zeros(d, d, dtype=F64)
    for s in range(N):
        P = SubsampledOrthogonal(d, q, seed=2000 + s, transform=transform).dense()
        acc += P.T @ P
    err = (acc / N - torch.eye(d, dtype=F64)).abs()
    assert (err <= 5 * sigma / math.sqrt(N) + 1e-12).all()


@pytest.mark.parametrize(("transform", "d", "q"), [("dct", 50, 9), ("wht", 64, 9), ("dct", 4106, 30)])
def test_subsampled_orthogonal_rows_are_orthogonal(transform: str, d: int, q: int) -> None:
    # Phi Phi^T = (n/Q) I_Q exactly (d = n here: DCT, or a power of 2 for the WHT). d = 4106 uses Bluestein.
    op = SubsampledOrthogonal(d, q, seed=13, transform=transform)
    P = op.adjoint(torch.eye(q, dtype=F64))  # row i = (Phi^T e_i)^T = row i of Phi
    torch.testing.assert_close(P @ P.T, (op.n / q) * torch.eye(q, dtype=F64), rtol=0, atol=1e-10)


def test_gaussian_entry_variance_is_one_over_m() -> None:
    # A_ij ~ N(0, 1/m): mean of the N = m d squared entries is 1/m with standard error (1/m) sqrt(2/N); 5 SE.
    d, m = 400, 50
    A = GaussianOperator(d, m, seed=14).matrix.double()
    N = m * d
    assert abs((A**2).mean().item() - 1 / m) <= 5 * (1 / m) * math.sqrt(2 / N)
    assert abs(A.mean().item()) <= 5 * math.sqrt(1 / m) / math.sqrt(N)


# ---------------------------------------------------------------- seeds, attributes, dtypes, degenerate input
def test_same_seed_same_operator_different_seed_differs() -> None:
    a, b, c = (PartialHadamard(1000, 64, seed=s, block=128) for s in (5, 5, 6))
    assert torch.equal(a.rows, b.rows) and torch.equal(a.signs, b.signs)
    assert not torch.equal(a.rows, c.rows) and not torch.equal(a.signs, c.signs)
    x = _randn(1000, dtype=torch.float32)
    assert torch.equal(a.forward(x), b.forward(x))
    s1, s2 = SubsampledOrthogonal(500, 40, seed=1), SubsampledOrthogonal(500, 40, seed=2)
    assert not torch.equal(s1.rows, s2.rows)
    g1, g2 = GaussianOperator(20, 5, seed=1), GaussianOperator(20, 5, seed=2)
    assert torch.equal(g1.matrix, GaussianOperator(20, 5, seed=1).matrix) and not torch.equal(g1.matrix, g2.matrix)


def test_attributes_shapes_and_row_subsets() -> None:
    op = PartialHadamard(1000, 16, seed=3, block=64)
    assert (op.n, op.blocks, op.m, op.shape) == (64, 16, 256, (256, 1000))
    assert op.rows.shape == (16, 16) and op.rows.dtype == torch.int64
    assert all(len(set(r.tolist())) == 16 for r in op.rows)  # without replacement
    assert (op.rows.diff(dim=1) > 0).all() and op.rows.min() >= 0 and op.rows.max() < 64
    assert len({tuple(r.tolist()) for r in op.rows}) > 1  # each block its own subset
    assert op.signs.shape == (1000,) and set(op.signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(PartialHadamard(10, 4, seed=0, signs=False).signs, torch.ones(10))
    so = SubsampledOrthogonal(1000, 70, seed=9, transform="wht")
    assert (so.n, so.m, so.rows.shape) == (1024, 70, (70,))


def test_dtypes_and_zero_vector() -> None:
    for op in (PartialHadamard(100, 10, seed=1), SubsampledOrthogonal(100, 10, seed=1), GaussianOperator(100, 10, seed=1)):
        assert op.forward(torch.zeros(100, dtype=torch.float16)).dtype == torch.float32
        assert op.forward(torch.zeros(100, dtype=F64)).dtype == F64
        assert torch.equal(op.forward(torch.zeros(3, 100)), torch.zeros(3, 10))
        assert torch.equal(op.adjoint(torch.zeros(10)), torch.zeros(100))
        with pytest.raises(CodecError, match="floating-point"):
            op.forward(torch.zeros(100, dtype=torch.int64))
        with pytest.raises(CodecError, match=r"expected shape \(\.\.\., 100\)"):
            op.forward(torch.zeros(99))
        with pytest.raises(CodecError, match=r"expected shape \(\.\.\., 10\)"):
            op.adjoint(torch.zeros(100))


def test_forward_does_not_modify_input() -> None:
    x = _randn(1024, dtype=torch.float32)  # power of 2, no signs: the padded buffer must still be a copy
    keep = x.clone()
    PartialHadamard(1024, 100, seed=1, signs=False).forward(x)
    SubsampledOrthogonal(1024, 100, seed=1, transform="wht").forward(x)
    assert torch.equal(x, keep)


def test_blockwise_at_tang_dimension_is_fast_and_consistent() -> None:
    # Abdi's partitions at d = 668,426: 2612 blocks of 256, k = 32, all in one batched fwht.
    d = 668426
    op = BlockwiseOperator(d, 32, seed=15, block=256)
    x, y = _randn(2, d, dtype=torch.float32, key="big"), _randn(2, op.m, dtype=torch.float32, key="bigy")
    lhs = (op.forward(x).double() * y.double()).sum(-1)
    rhs = (x.double() * op.adjoint(y).double()).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PartialHadamard(100, 300, seed=0, block=256), "k=300 exceeds"),
        (lambda: PartialHadamard(100, 10, seed=0, block=100), "power of 2"),
        (lambda: PartialHadamard(100, 10, seed=0, rows="last"), "rows must be"),
        (lambda: PartialHadamard(0, 10, seed=0), "d must be a positive int"),
        (lambda: PartialHadamard(100, 10, seed=1.5), "seed must be an int"),
        (lambda: BlockwiseOperator(100, 10, seed=0, block=None), "block is required"),
        (lambda: SubsampledOrthogonal(100, 101, seed=0), "q=101 exceeds"),
        (lambda: SubsampledOrthogonal(100, 10, seed=0, transform="fft"), "transform must be"),
        (lambda: GaussianOperator(1 << 20, 1 << 7, seed=0), "exceeds 2\\^26"),
    ],
)
def test_constructor_errors(factory, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        factory()


@pytest.mark.parametrize(("blocks", "n", "k"), [(1, 64, 8), (1, 64, 40), (3, 32, 5)])
def test_row_subsets_are_uniform(blocks: int, n: int, k: int) -> None:
    # Each index is in a uniform k-subset with probability k/n. Over N seeds its count is Binomial(N, k/n):
    # sd = sqrt(N (k/n)(1 - k/n)); all counts within 5 sd (false-alarm probability < 1e-4 over <= 96 counts).
    # (1, 64, 8) takes the oversampling path, the others the topk path.
    from fl_sim.compression.projections import _row_subsets

    N = 2000
    counts = torch.zeros(blocks, n)
    for s in range(N):
        rows = _row_subsets(blocks, n, k, torch_generator(3000 + s, "subset"))
        assert rows.shape == (blocks, k) and (rows.diff(dim=1) > 0).all()
        counts.scatter_add_(1, rows, torch.ones(blocks, k))
    p = k / n
    sd = math.sqrt(N * p * (1 - p))
    assert (counts - N * p).abs().max().item() <= 5 * sd
