"""fwht / dct / idct / next_pow2 (fl_sim/compression/transforms.py) against dense references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.linalg
import torch

from fl_sim.compression.base import CodecError
from fl_sim.compression.transforms import _fwht_torch, dct, fwht, idct, next_pow2
from fl_sim.rng import torch_generator


def _randn(*shape: int, dtype: torch.dtype = torch.float64, key: str = "x") -> torch.Tensor:
    return torch.randn(*shape, generator=torch_generator(0, "test_transforms", key, *shape), dtype=dtype)


# ---------------------------------------------------------------- next_pow2
def test_next_pow2_values() -> None:
    assert [next_pow2(n) for n in (1, 2, 3, 4, 5, 1000, 1024, 1025, 668426)] == [
        1, 2, 4, 4, 8, 1024, 1024, 2048, 1048576
    ]


@pytest.mark.parametrize("bad", [0, -3, 2.0, "8"])
def test_next_pow2_rejects_non_positive_int(bad: object) -> None:
    with pytest.raises(CodecError, match="positive int"):
        next_pow2(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fwht: exact values
@pytest.mark.parametrize("n", [2**e for e in range(11)])
def test_fwht_equals_dense_hadamard_batched(n: int) -> None:
    x = _randn(2, 3, n)
    H = torch.from_numpy(scipy.linalg.hadamard(n).astype(np.float64))
    torch.testing.assert_close(fwht(x), x @ H.T, rtol=0, atol=1e-12 * n)
    y32 = fwht(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), x @ H.T, rtol=0, atol=1e-5 * n)


def test_fwht_tiny_hand_computed() -> None:
    # H_4 = [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert fwht(x).tolist() == [10.0, -2.0, -4.0, 0.0]
    assert fwht(torch.tensor([5.0])).tolist() == [5.0]


@pytest.mark.parametrize(
    ("n", "dtype"),
    # 2^17 float32 / 2^16 float64 exceed one 128 KiB cache block (phase-2 panels); 2^18 uses the thread pool.
    [(2**17, torch.float32), (2**16, torch.float64), (2**18, torch.float32)],
)
def test_fwht_blocked_kernel_matches_reference_butterfly(n: int, dtype: torch.dtype) -> None:
    x = _randn(2, n, dtype=dtype)
    ref = _fwht_torch(x.double())
    atol = 1e-9 if dtype == torch.float64 else 2e-6 * n**0.5 * 8  # float32 rounding ~ eps * sqrt(n) * |x|
    torch.testing.assert_close(fwht(x).double(), ref, rtol=0, atol=atol)


def test_fwht_involution_scaled_by_n() -> None:
    n = 2**12
    x = _randn(3, n)
    torch.testing.assert_close(fwht(fwht(x)), n * x, rtol=1e-12, atol=1e-9)


def test_fwht_same_result_with_one_or_two_threads() -> None:
    x = _randn(2**18, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fwht(x)
        torch.set_num_threads(2)
        two = fwht(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # same operations per element, only split differently


# ---------------------------------------------------------------- fwht: inplace, dtypes, autograd, devices
def test_fwht_inplace_overwrites_and_returns_input() -> None:
    x = _randn(4, 64)
    expected = fwht(x)
    out = fwht(x, inplace=True)
    assert out is x
    torch.testing.assert_close(x, expected)


def test_fwht_inplace_on_non_contiguous_view() -> None:
    base = _randn(64, 4)
    view = base.T  # (4, 64), not contiguous
    expected = fwht(view.contiguous())
    out = fwht(view, inplace=True)
    assert out is view
    torch.testing.assert_close(base.T, expected)


def test_fwht_does_not_modify_input_by_default() -> None:
    x = _randn(1024, dtype=torch.float32)
    keep = x.clone()
    fwht(x)
    assert torch.equal(x, keep)


def test_fwht_float16_computed_and_returned_in_float32() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16)
    y = fwht(x)
    assert y.dtype == torch.float32 and y.tolist() == [10.0, -2.0, -4.0, 0.0]


def test_fwht_zero_in_zero_out_and_empty_batch() -> None:
    assert torch.equal(fwht(torch.zeros(3, 256)), torch.zeros(3, 256))
    assert fwht(torch.zeros(0, 8)).shape == (0, 8)


def test_fwht_huge_and_tiny_magnitudes_stay_finite() -> None:
    x = _randn(512, dtype=torch.float32)
    for scale in (1e-30, 1e30):
        y = fwht(x * scale)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y / scale, fwht(x), rtol=1e-5, atol=1e-4)


def test_fwht_autograd_uses_differentiable_path() -> None:
    # d/dx sum(H x) = H^T 1 = column sums of H = n e_0 (only column 0 of a Sylvester H is all ones; every other
    # column has n/2 entries +1 and n/2 entries -1).
    n = 16
    x = _randn(n).requires_grad_(True)
    fwht(x).sum().backward()
    expected = torch.zeros(n, dtype=torch.float64)
    expected[0] = n
    torch.testing.assert_close(x.grad, expected)


def test_fwht_torch_fallback_equals_kernel() -> None:
    x = _randn(5, 2048)
    torch.testing.assert_close(_fwht_torch(x), fwht(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [3, 6, 1000, 0])
def test_fwht_rejects_non_power_of_two(n: int) -> None:
    with pytest.raises(CodecError, match="power of 2"):
        fwht(torch.zeros(2, n))


def test_fwht_rejects_bad_inputs() -> None:
    with pytest.raises(CodecError, match="floating-point"):
        fwht(torch.ones(8, dtype=torch.int64))
    with pytest.raises(CodecError, match="scalar"):
        fwht(torch.tensor(1.0))
    with pytest.raises(CodecError, match="torch.Tensor"):
        fwht(np.ones(8))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="inplace"):
        fwht(torch.ones(8, dtype=torch.float16), inplace=True)


# ---------------------------------------------------------------- dct / idct
@pytest.mark.parametrize(
    "d",
    # small lengths, power of 2, odd, and lengths >= 4096 with a prime factor > 101 that take the Makhoul +
    # prime-splitting path: 4106 = 2 * 2053 (even), 4099 (prime, odd), 22042 = 2 * 103 * 107 (two splits),
    # 11021 = 103 * 107 (odd, two splits).
    [1, 2, 3, 7, 64, 1000, 4106, 4099, 22042, 11021],
)
def test_dct_matches_scipy_ortho_and_inverts(d: int) -> None:
    x = _randn(3, d)
    ref = scipy.fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    y = dct(x)
    assert y.dtype == torch.float64 and y.shape == (3, d)
    np.testing.assert_allclose(y.numpy(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(idct(y), x, rtol=0, atol=1e-12)
    y32 = dct(x.float())
    assert y32.dtype == torch.float32
    np.testing.assert_allclose(y32.double().numpy(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(idct(y32).double(), x, rtol=0, atol=1e-5)


def test_dct_at_tang_dimension_matches_scipy() -> None:
    # d = 668,426 = 2 * 11 * 23 * 1321 (Tang et al.'s ResNet): the prime-splitting path, checked once against scipy.
    d = 668426
    x = _randn(d, dtype=torch.float32)
    y = dct(x)
    ref = scipy.fft.dct(x.double().numpy(), norm="ortho")
    # float32 FFTs of length ~6.7e5: error ~ eps32 * log2(M) * ||x||_2 / sqrt(d) * few ~ 1e-5; observed ~2e-6.
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(idct(y), x, rtol=0, atol=2e-5)


@pytest.mark.parametrize("d", [5, 8, 4106])
def test_dct_matrix_is_orthonormal(d: int) -> None:
    if d > 100:
        eye = torch.eye(d, dtype=torch.float64)[:40]  # 40 columns suffice for C^T C on a slice
        C_cols = dct(eye)  # rows: C e_j = column j of C
        torch.testing.assert_close(C_cols @ C_cols.T, torch.eye(40, dtype=torch.float64), atol=1e-12, rtol=0)
        return
    C = dct(torch.eye(d, dtype=torch.float64)).T  # column j = dct(e_j)
    torch.testing.assert_close(C @ C.T, torch.eye(d, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(idct(torch.eye(d, dtype=torch.float64)), C, atol=1e-12, rtol=0)  # idct = C^T


def test_dct_zero_float16_and_errors() -> None:
    assert torch.equal(dct(torch.zeros(2, 10)), torch.zeros(2, 10))
    assert torch.equal(idct(torch.zeros(4106)), torch.zeros(4106))
    assert dct(torch.ones(6, dtype=torch.float16)).dtype == torch.float32
    with pytest.raises(CodecError, match="floating-point"):
        dct(torch.ones(4, dtype=torch.int32))
    with pytest.raises(CodecError, match="empty"):
        idct(torch.zeros(3, 0))


def test_fwht_without_numba_uses_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import fl_sim.compression.transforms as transforms

    x = _randn(3, 256)
    expected = fwht(x)
    monkeypatch.setattr(transforms, "_HAVE_NUMBA", False)
    y = x.clone()
    assert transforms.fwht(y, inplace=True) is y
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
