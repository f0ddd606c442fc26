"""SecAgg+ on the wire: stage names, record keys, the fixed-point field encoding and the masks.

Shared by the server piece (``fl_sim.strategies.secagg``) and the client mod
(``fl_sim.clients.secagg_mod``) of Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020 ([Bell-2020]), the protocol Flower implements for its legacy API. The cryptography
is Flower's own (``flwr.common.secure_aggregation``: X25519 key agreement and Fernet encryption,
Shamir sharing, the mask PRG); this module adds what the Message-API orchestration needs.

Fixed-point encoding (the field Z_M, M = ``modulus_range``; T = ``quantization_range``; c =
``clipping_range``; W = ``max_weight``). Client i with weight n_i sends, for every float entry x of
what it would send in plaintext (its payload tensors, or Δ_i for a plain model update),

    v = (n_i / W) · x,      q = SR((clip(v, −c, c) + c) · T / (2c)) ∈ {0, …, T}

with unbiased stochastic rounding SR, plus n_i itself as one exact integer entry. The server learns
only Σ_i q_i mod M, and, when K · T < M (checked: no wrap-around), recovers

    Σ_i v̂_i = (2c/T) · Σ_i q_i − K·c,     mean = W · Σ_i v̂_i / Σ_i n_i.

Error bound: SR moves each entry by less than one step δ = 2c/T and is unbiased, so for entries with
|v| ≤ c the recovered sum is within K·δ of Σ_i v_i (worst case) and its error has standard deviation at
most √K·δ/2; the weighted mean is within W·K·δ / Σ_i n_i. Entries with |v| > c are clipped (a bias; the
client counts them in ``secagg-clipped``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

__all__ = [
    "RECORD", "STATE_PREFIX", "Stage", "SecAggKey", "field_dtype", "field_bits", "to_field", "from_field",
    "prg_mask", "neighbours", "resolve_counts",
]

RECORD = "fl-sim.secagg"  # the ConfigRecord of a stage message and of its reply
STATE_PREFIX = "fl-sim.secagg."  # + client id: one client's protocol state in the node's context.state
MASKED = "fl-sim.secagg.masked"  # the ArrayRecord of a masked vector


class Stage:
    """The four stages of one SecAgg+ round (Flower's names)."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED_VECTORS = "collect_masked_vectors"
    UNMASK = "unmask"
    ALL = (SETUP, SHARE_KEYS, COLLECT_MASKED_VECTORS, UNMASK)


class SecAggKey:
    """ConfigRecord keys of the stage messages (server -> client) and replies."""

    STAGE = "stage"
    SID = "sid"  # the client's secure id this round (1..N; Shamir x-coordinates and mask signs)
    SHARE_NUMBER = "share_num"
    THRESHOLD = "threshold"
    CLIPPING_RANGE = "clipping_range"
    TARGET_RANGE = "target_range"
    MOD_RANGE = "mod_range"
    MAX_WEIGHT = "max_weight"
    WEIGHT_KEY = "weight_key"  # the metric holding n_i (the inner strategy's weighted_by_key)
    PK1 = "pk1"
    PK2 = "pk2"
    SIDS = "sids"
    PK1S = "pk1s"
    PK2S = "pk2s"
    DSTS = "dsts"
    CTXTS = "ctxts"
    SRCS = "srcs"
    ACTIVE = "active"
    DEAD = "dead"
    SHARE_OWNERS = "owners"
    SHARES = "shares"
    NAMES = "names"  # masked reply: payload tensor names, shapes (JSON), dtypes; empty = a model update Δ
    SHAPES = "shapes"
    DTYPES = "dtypes"
    HAS_LOSS = "loss_key"  # the name of the train-loss metric summed as an extra entry; "" = none
    CLIPPED = "secagg-clipped"  # metric: entries clipped to ±c


def field_dtype(mod_range: int) -> np.dtype:
    """The smallest unsigned dtype holding Z_M (what a masked entry costs on the wire)."""
    return np.dtype(np.uint32) if mod_range <= 2**32 else np.dtype(np.uint64)


def field_bits(mod_range: int) -> int:
    return 8 * field_dtype(mod_range).itemsize


def to_field(v: torch.Tensor, clipping_range: float, target_range: int,
             generator: torch.Generator) -> tuple[np.ndarray, int]:
    """(q, number clipped): ``v`` (already weighted) clipped to ±c and stochastically rounded onto
    {0, …, T} (module docstring); int64."""
    v64 = v.detach().reshape(-1).to(torch.float64)
    clipped = int((v64.abs() > clipping_range).sum())
    scaled = (v64.clamp(-clipping_range, clipping_range) + clipping_range) * (target_range / (2 * clipping_range))
    low = scaled.floor()
    q = low + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - low)).to(torch.float64)
    return q.to(torch.int64).numpy(), clipped


def from_field(total: np.ndarray, count: int, clipping_range: float, target_range: int) -> torch.Tensor:
    """Σ_i v̂_i from Σ_i q_i of ``count`` clients (float64): (2c/T) Σ q − K c."""
    t = torch.from_numpy(np.asarray(total, dtype=np.int64)).to(torch.float64)
    return t * (2 * clipping_range / target_range) - count * clipping_range


def prg_mask(seed: bytes, mod_range: int, length: int) -> np.ndarray:
    """The mask vector expanded from ``seed`` by Flower's SecAgg+ PRG (int64 values in Z_M)."""
    return pseudo_rand_gen(seed, mod_range, [(length,)])[0]


def neighbours(sids: list[int], num_shares: int) -> dict[int, set[int]]:
    """SecAgg+'s communication graph: ``sids`` (already in the server's random order) on a ring, each
    with the ``num_shares`` // 2 on either side and itself (Flower's SecAggPlusWorkflow)."""
    n = len(sids)
    half = num_shares >> 1
    return {s: {sids[(i + o) % n] for o in range(-half, half + 1)} for i, s in enumerate(sids)}


def resolve_counts(num_shares: int | float, reconstruction_threshold: int | float, n: int) -> tuple[int, int]:
    """(shares per client, threshold t) for ``n`` clients, with Flower's meanings: an int is a count, a
    float a fraction (of n for shares; of the shares for t); shares odd (a symmetric ring), t >= 2."""
    if isinstance(num_shares, float):
        shares = round(num_shares * n)
        if shares < n and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = n
    else:
        shares = int(num_shares)
    shares = min(shares, n)
    if shares < n and shares % 2 == 0:
        shares += 1
    if isinstance(reconstruction_threshold, float):
        t = max(round(reconstruction_threshold * shares), 2)
    else:
        t = int(reconstruction_threshold)
    if not 2 <= t <= shares:
        raise ValueError(f"reconstruction_threshold={reconstruction_threshold} gives t={t} for {shares} shares "
                         f"({n} clients): t must be in [2, shares]")
    return shares, t


def log_neighbours(n: int) -> int:
    """An odd share count growing as log n ([Bell-2020]: O(log n) neighbours suffice): 2⌈log2 n⌉ + 1, at most n."""
    return min(n, 2 * math.ceil(math.log2(max(n, 2))) + 1)
