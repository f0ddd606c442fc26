"""The codec layer's errors and its one shared count, imported by :mod:`~fl_sim.compression.base` (which
re-exports them) and by :mod:`~fl_sim.compression.packing`, which ``base`` itself uses."""

from __future__ import annotations

import math

__all__ = ["CodecError", "PayloadError", "bits_for_index"]


class CodecError(ValueError):
    """Bad codec construction or input (unknown parameter, wrong dimension, NaN input)."""


class PayloadError(ValueError):
    """A payload that cannot be decoded (wrong codec, shape, dtype, non-finite values)."""


def bits_for_index(n: int) -> int:
    """Bits to send one index in range(n): ceil(log2 n), at least 1 for n >= 2, 0 for n == 1."""
    return 0 if n <= 1 else math.ceil(math.log2(n))
