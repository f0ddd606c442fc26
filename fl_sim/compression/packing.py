"""Wire packing: a payload's tensors as the bytes its bit count describes, and back with strict checks.

A codec's :class:`~fl_sim.compression.base.Payload` holds convenient tensors (int8 levels, int64
indices); what is sent is the packed form below, so the bytes a deployment measures are the bits the
codec counts, rounded up to a whole byte per array. Each codec names one :class:`Field` per tensor
(:meth:`Codec.wire_fields`); joint codes (QSGD's Elias stream of norms and levels) override
:meth:`Codec.wire_arrays` / :meth:`Codec.from_wire` instead.

* :class:`Plain`: floats at their declared precision (float32 values, scales and norms; float16 for
  ``fp16``), sent as they are.
* :class:`Levels`: an alphabet ``lo, lo + step, .., hi`` of n values as fixed-width codes
  ``(v - lo) / step`` of w = ceil(log2 n) bits, MSB first, concatenated and cut into bytes
  (``numpy.packbits`` order): signs and 1-bit measurements 8 per byte, ternary levels 4 per byte, QCS's
  {-Q..Q} at ceil(log2(2Q + 1)) bits. The last byte is padded with zero bits.
* :class:`Indices`: k sorted distinct indices into range(d) (top-k), coded as

  - ``"fixed"``: k codes of ceil(log2 d) bits;
  - ``"elias"``: Elias omega codes of the 1-based gaps (:func:`~fl_sim.compression.coding.index_gaps`);
  - ``"auto"`` (top-k's default): one flag bit (0 fixed, 1 elias) and then whichever of the two is
    shorter for these indices (fixed on a tie): k ceil(log2 d) bits are the better code for a dense
    selection, gaps for a sparse or clustered one.

  Variable-length streams are padded with one bits (as JPEG pads its entropy-coded segments): every
  Elias omega code word ends in a 0, so a tail of fewer than 8 one bits is never a code and marks the
  end of a stream whose exact length in bits the receiver is not told.

Unpacking is strict: an array of the wrong dtype or length (bytes), non-zero (or non-one) padding bits,
or a code outside the alphabet raises :class:`~fl_sim.compression.base.PayloadError` naming the array,
so the server's per-reply checks reject the reply. Packing and unpacking are numpy bit operations
(``packbits`` / ``unpackbits`` over the whole array), no Python loop over coordinates; Elias streams use
the vectorized coder and numba decoder of :mod:`fl_sim.compression.coding`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from fl_sim.compression.errors import PayloadError, bits_for_index
from fl_sim.compression.coding import (
    StreamError,
    decode_omegas_from,
    elias_omega_codewords,
    elias_omega_lengths,
    index_gaps,
    pack_fields,
)

__all__ = [
    "INDEX_CODINGS",
    "Field",
    "Plain",
    "Levels",
    "Indices",
    "pack_uint",
    "unpack_uint",
    "pad_ones",
    "check_ones_tail",
    "index_bits",
    "pack_indices",
    "unpack_indices",
    "wire_bits",
]

INDEX_CODINGS = ("auto", "fixed", "elias")


def wire_bits(arrays) -> int:
    """8 x the bytes of the arrays' data (what the payload occupies on the wire, framing excluded)."""
    return 8 * sum(int(np.asarray(a).nbytes) for a in arrays)


# -- fixed-width unsigned codes ------------------------------------------------------------------------------
def _be_dtype(width: int) -> np.dtype:
    """The smallest big-endian unsigned dtype of at least ``width`` bits."""
    for dt in (">u1", ">u2", ">u4", ">u8"):
        if np.dtype(dt).itemsize * 8 >= width:
            return np.dtype(dt)
    raise ValueError(f"code width {width} > 64 bits")


def _code_bits(codes: np.ndarray, width: int) -> np.ndarray:
    """(n, width) uint8 0/1: each code's ``width`` low bits, MSB first."""
    dt = _be_dtype(width)
    raw = np.ascontiguousarray(codes, dtype=dt).view(np.uint8).reshape(-1, dt.itemsize)
    return np.unpackbits(raw, axis=1)[:, dt.itemsize * 8 - width:]


def _codes_from_bits(bits: np.ndarray, width: int, count: int) -> np.ndarray:
    """int64 (count,) from ``count * width`` 0/1 bits, MSB first (inverse of :func:`_code_bits`)."""
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    if width == 1:
        return bits[:count].astype(np.int64)
    dt = _be_dtype(width)
    lead = dt.itemsize * 8 - width
    b = bits[: count * width].reshape(count, width)
    if lead:
        b = np.concatenate([np.zeros((count, lead), dtype=np.uint8), b], axis=1)
    return np.packbits(b, axis=1).view(dt).reshape(count).astype(np.int64)


def pack_uint(codes: np.ndarray, width: int) -> np.ndarray:
    """Unsigned codes (each < 2^width) as consecutive ``width``-bit fields, MSB first, zero-padded to bytes:
    ceil(n width / 8) bytes (uint8)."""
    codes = np.asarray(codes).reshape(-1)
    if width == 0 or codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if width == 1:
        return np.packbits(codes.astype(np.uint8, copy=False))
    if width in (8, 16, 32, 64):  # whole bytes: the big-endian bytes of each code
        return np.ascontiguousarray(codes, dtype=_be_dtype(width)).view(np.uint8).copy()
    return np.packbits(_code_bits(codes, width))


def _byte_array(buf: object, name: str) -> np.ndarray:
    a = np.asarray(buf)
    if a.dtype != np.uint8 or a.ndim != 1:
        raise PayloadError(f"array {name!r} must be packed bytes (1-D uint8), got {a.dtype} of shape {a.shape}")
    return a


def unpack_uint(buf: np.ndarray, width: int, count: int, name: str) -> np.ndarray:
    """int64 (count,) codes from :func:`pack_uint`'s bytes; PayloadError for a wrong byte count or
    non-zero padding bits."""
    buf = _byte_array(buf, name)
    nbits = count * width
    expected = -(-nbits // 8)
    if buf.size != expected:
        raise PayloadError(f"array {name!r} has {buf.size} bytes; {count} codes of {width} bits take {expected}")
    if width in (8, 16, 32, 64):
        return buf.view(_be_dtype(width)).astype(np.int64)
    bits = np.unpackbits(buf)
    if bits[nbits:].any():
        raise PayloadError(f"array {name!r}: padding bits after the last code are not zero")
    return _codes_from_bits(bits, width, count)


# -- variable-length streams ------------------------------------------------------------------------------
def pad_ones(buf: np.ndarray, nbits: int) -> np.ndarray:
    """A packed stream of ``nbits`` bits with the unused low bits of its last byte set to 1 (in place)."""
    spare = -nbits % 8
    if spare:
        buf[-1] |= np.uint8((1 << spare) - 1)
    return buf


def check_ones_tail(bits: np.ndarray, end: int, name: str) -> None:
    """After a stream's last code at bit ``end``: fewer than 8 bits left, all ones (the padding)."""
    tail = bits[end:]
    if tail.size >= 8 or not tail.all():
        raise PayloadError(f"array {name!r}: {tail.size} bits after the last code; expected fewer than 8 "
                           "padding bits, all ones")


# -- sorted indices -----------------------------------------------------------------------------------------
def _fixed_width(dim: int) -> int:
    return bits_for_index(dim)


def index_bits(idx: torch.Tensor | np.ndarray, dim: int, coding: str) -> int:
    """Exact bits of the index code of sorted distinct ``idx`` (flag bit included for "auto")."""
    idx = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    fixed = idx.size * _fixed_width(dim)
    if coding == "fixed":
        return int(fixed)
    gaps = int(elias_omega_lengths(index_gaps(idx)).sum()) if idx.size else 0
    if coding == "elias":
        return gaps
    return 1 + min(int(fixed), gaps)


def pack_indices(idx: torch.Tensor | np.ndarray, dim: int, coding: str) -> np.ndarray:
    """The bytes of :func:`index_bits`' code: fixed codes zero-padded, gap streams one-padded."""
    idx = np.asarray(idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
    width = _fixed_width(dim)
    if coding == "fixed":
        return pack_uint(idx, width)
    gv, gl = elias_omega_codewords(index_gaps(idx)) if idx.size else (np.zeros(0, np.uint64), np.zeros(0, np.int64))
    use_elias = coding == "elias" or int(gl.sum()) < idx.size * width
    if use_elias:
        values, lengths = gv, gl
    else:
        values, lengths = idx.astype(np.uint64), np.full(idx.size, width, dtype=np.int64)
    if coding == "auto":  # the flag bit first
        values = np.concatenate([np.array([1 if use_elias else 0], dtype=np.uint64), values])
        lengths = np.concatenate([np.ones(1, dtype=np.int64), lengths])
    buf, nbits = pack_fields(values, lengths)
    return pad_ones(buf, nbits) if use_elias else buf


def unpack_indices(buf: np.ndarray, dim: int, count: int, coding: str, name: str) -> np.ndarray:
    """int64 (count,) indices from :func:`pack_indices`' bytes; PayloadError for a wrong length, bad padding,
    a malformed gap code or an index outside range(dim)."""
    buf = _byte_array(buf, name)
    width = _fixed_width(dim)
    if coding == "fixed":
        idx = unpack_uint(buf, width, count, name)
    else:
        bits = np.unpackbits(buf)
        start = 0
        elias = coding == "elias"
        if coding == "auto":
            if bits.size == 0:
                raise PayloadError(f"array {name!r} is empty; the index code starts with a flag bit")
            elias, start = bool(bits[0]), 1
        if elias:
            try:
                gaps, end = decode_omegas_from(bits, start, count)
            except StreamError as exc:
                raise PayloadError(f"array {name!r}: {exc}") from None
            check_ones_tail(bits, end, name)
            if count and int(gaps.max()) > dim:
                raise PayloadError(f"array {name!r}: an index gap past the end of range({dim})")
            idx = np.cumsum(gaps) - 1
        else:
            nbits = start + count * width
            if buf.size != -(-nbits // 8):
                raise PayloadError(f"array {name!r} has {buf.size} bytes; a flag and {count} indices of "
                                   f"{width} bits take {-(-nbits // 8)}")
            if bits[nbits:].any():
                raise PayloadError(f"array {name!r}: padding bits after the last index are not zero")
            idx = _codes_from_bits(bits[start:], width, count)
    if count and int(idx.max()) >= dim:
        raise PayloadError(f"array {name!r}: index {int(idx.max())} outside range({dim})")
    return idx


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


# -- per-tensor fields -----------------------------------------------------------------------------------------
class Field(ABC):
    """How one payload tensor of a known shape and dtype travels: pack to a numpy array, unpack checked."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def count(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @abstractmethod
    def pack(self, t: torch.Tensor) -> np.ndarray:
        """The array sent for tensor ``t``."""

    @abstractmethod
    def unpack(self, a: np.ndarray, name: str) -> torch.Tensor:
        """The tensor back from a received array (a fresh tensor); PayloadError when malformed."""


class Plain(Field):
    """A tensor sent as it is (floats at their declared precision)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = tuple(shape), dtype

    def pack(self, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().contiguous().numpy()

    def unpack(self, a: np.ndarray, name: str) -> torch.Tensor:
        t = torch.from_numpy(np.array(a, copy=True))
        if t.dtype != self.dtype or tuple(t.shape) != self.shape:
            raise PayloadError(f"array {name!r} is {t.dtype} of shape {tuple(t.shape)}, expected {self.dtype} "
                               f"of shape {self.shape}")
        return t


class Levels(Field):
    """Integer levels in ``lo, lo + step, .., hi`` as codes (v - lo) / step of ceil(log2 n) bits (n values)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, lo: int, hi: int, step: int = 1) -> None:
        if step < 1 or hi < lo or (hi - lo) % step:
            raise ValueError(f"Levels: bad alphabet lo={lo}, hi={hi}, step={step}")
        self.shape, self.dtype, self.lo, self.hi, self.step = tuple(shape), dtype, int(lo), int(hi), int(step)
        self.top = (self.hi - self.lo) // self.step  # the largest code
        self.width = bits_for_index(self.top + 1)

    def pack(self, t: torch.Tensor) -> np.ndarray:
        v = t.detach().cpu().reshape(-1).numpy().astype(np.int64)  # numpy casts: torch's are slower here
        codes = (v - self.lo) // self.step if self.step > 1 else v - self.lo
        return pack_uint(codes, self.width)

    def unpack(self, a: np.ndarray, name: str) -> torch.Tensor:
        codes = unpack_uint(a, self.width, self.count, name)
        if codes.size and int(codes.max()) > self.top:
            raise PayloadError(f"array {name!r}: code {int(codes.max())} outside 0..{self.top} "
                               f"(levels {self.lo}..{self.hi} step {self.step})")
        values = codes * self.step + self.lo if self.step > 1 else codes + self.lo
        return torch.from_numpy(values.astype(_numpy_dtype(self.dtype)).reshape(self.shape))


class Indices(Field):
    """k sorted distinct indices into range(dim) (int64), coded per ``coding`` (module docstring)."""

    def __init__(self, count: int, dim: int, coding: str) -> None:
        if coding not in INDEX_CODINGS:
            raise ValueError(f"index coding {coding!r}: use one of {', '.join(INDEX_CODINGS)}")
        self.shape, self.dtype, self.dim, self.coding = (int(count),), torch.int64, int(dim), coding

    def pack(self, t: torch.Tensor) -> np.ndarray:
        return pack_indices(t, self.dim, self.coding)

    def unpack(self, a: np.ndarray, name: str) -> torch.Tensor:
        return torch.from_numpy(unpack_indices(a, self.dim, self.count, self.coding, name))
