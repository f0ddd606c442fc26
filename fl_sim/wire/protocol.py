"""What a strategy and its client piece must compute identically: codec specs and seeds.

Randomness is never sent: both sides rebuild it from the round seed in the ConfigRecord (keys.SEED,
``round_seed(run seed, round)``) and the client id (keys.CID), as ``Seeds(seed, client)``
(fl_sim.compression.base; its docstring gives the contract). ``seed-mode``:

* ``"per_client"`` (default): ``Seeds(round seed, cid)``. A codec's common parts (a sensing matrix or
  hash family summed in the compressed domain) come from the round seed and are the same for every
  client; its own parts (rotations, row subsets, dither, stochastic rounding) come from
  ``derive_seed(round seed, "client", cid)`` and are independent across clients, as the papers'
  workers are. The server rebuilds each client's seeds because it knows whom it sampled.
* ``"shared"``: ``Seeds(round seed, None)``: every client of a round draws the same randomness, own
  parts included (fl-sim's behaviour before per-client seeds; the clients' errors are then identical for
  identical updates and averaging does not shrink them). Kept to reproduce old results.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from fl_sim.compression import Codec, Seeds, make_codec
from fl_sim.rng import derive_seed

__all__ = ["SEED_MODES", "DEFAULT_SEED_MODE", "check_seed_mode", "codec_seeds", "round_seed", "get_codec",
           "dump_params", "load_params"]

SEED_MODES = ("per_client", "shared")
DEFAULT_SEED_MODE = "per_client"


def round_seed(run_seed: int, server_round: int) -> int:
    """The seed of one round's shared randomness (63-bit, fits a ConfigRecord int)."""
    return derive_seed(run_seed, server_round, "round")


def check_seed_mode(mode: str) -> str:
    if mode not in SEED_MODES:
        raise ValueError(f"seed_mode={mode!r}: use 'per_client' (independent client randomness, the papers') "
                         "or 'shared' (one randomness for all clients of a round, the old behaviour)")
    return mode


def codec_seeds(seed: int, mode: str, cid: int) -> Seeds:
    """The seeds client ``cid`` encodes with in the round of ``seed`` (the server decodes with the same)."""
    return Seeds(int(seed), None if check_seed_mode(mode) == "shared" else int(cid))


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
