"""Seeded randomness: every random object comes from a generator keyed by (seed, round, purpose, id).

Never the global RNG. ``derive_seed(run_seed, round, "dither", client_id)`` maps any tuple of ints
and strings to a 63-bit seed with BLAKE2b, so adding a new purpose never shifts another stream.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["derive_seed", "torch_generator", "numpy_generator"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings (stable across processes and platforms)."""
    h = hashlib.blake2b(digest_size=8)
    for k in keys:
        h.update(repr(k).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def torch_generator(*keys: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``derive_seed(*keys)``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


def numpy_generator(*keys: int | str) -> np.random.Generator:
    """A NumPy ``Generator`` (PCG64) seeded from ``derive_seed(*keys)``."""
    return np.random.default_rng(derive_seed(*keys))
