"""What a strategy and its client piece must compute identically: codec specs and seeds.

Shared randomness is never sent: both sides rebuild it from the round seed in the ConfigRecord.
``seed-mode`` "shared" gives every client of a round the same randomness (a common sensing matrix,
summable in the compressed domain); "per_client" derives one seed per client id (per-worker Φ of
Mitra & Khisti), which the server can rebuild because it knows whom it sampled.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from .compression import Codec, make_codec
from .rng import derive_seed

__all__ = ["codec_seed", "round_seed", "get_codec", "dump_params", "load_params"]


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed of one round's shared randomness (63-bit, fits a ConfigRecord int)."""
    return derive_seed(run_seed, server_round, "round")


def codec_seed(seed: int, mode: str, cid: int) -> int:
    """Seed a client encodes with: the round seed, or one derived per client."""
    if mode == "shared":
        return int(seed)
    if mode == "per_client":
        return derive_seed(int(seed), "client", int(cid))
    raise ValueError(f"seed mode {mode!r} unknown; use 'shared' or 'per_client'")


def dump_params(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def load_params(text: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    if not isinstance(value, dict):
        raise ValueError(f"codec parameters must be a JSON object, got {text!r}")
    return value


@lru_cache(maxsize=32)
def _codec_cached(name: str, dim: int, params_json: str) -> Codec:
    return make_codec(name, dim=dim, **load_params(params_json))


def get_codec(name: str, dim: int, params: dict[str, Any] | str) -> Codec:
    """A codec from the process-wide cache (codecs are stateless apart from per-seed caches)."""
    text = params if isinstance(params, str) else dump_params(params)
    return _codec_cached(name, int(dim), text)
