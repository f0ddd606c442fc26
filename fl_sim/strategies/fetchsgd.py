"""FetchSGD: Count Sketch uplink with momentum and error accumulated in sketch space at the server.

Rothchild et al., "FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML 2020,
Algorithm 1 (not among shared/papers; summarised in shared/papers/README.md). Its reference code is
CommEfficient with the csvec sketch.

One sketch S(·) (r rows × c columns, hashes from the run seed, the same for all clients and rounds,
so sketches of different rounds can be added). Round t:

1. client i sends S(Δ_i) (``count_sketch`` codec; Δ_i = local − global);
2. server: S^t = Σ_i (n_i/n) S(Δ_i)                           (linearity)
3. momentum:  S_u ← ρ S_u + S^t
4. error:     S_e ← S_e + η_s S_u
5. Δ = Top-k(U(S_e)): unsketch the k heavy coordinates of S_e (median estimates)
6. S_u and S_e are zeroed at the buckets of nz(Δ) ("S_u(nz Δ) = 0, S_e(nz Δ) = 0")
7. the inner strategy gets w + Δ from every client (FedAvg: w ← w + Δ; FedAdam: its step on Δ).

ρ = 0 gives "Count Sketch + error feedback", the baseline of Tang et al. (FetchSGD without momentum).
The server knows ‖S_e‖ before and after extraction; it reports their ratio as the recovery metric.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import Strategy

from .. import keys
from ..compression.sketch import CountSketch
from ..rng import derive_seed
from .base import ClientReply
from .compressed import CompressedFedAvg

__all__ = ["FetchSGD"]


class FetchSGD(CompressedFedAvg):
    """FetchSGD (Rothchild et al. 2020, Alg. 1).

    Args:
        inner: the aggregating strategy (None: FedAvg with ``**kwargs``); it gets w + Δ.
        rows, cols: sketch size r × c (uplink 32·r·c bits per client).
        k: coordinates unsketched and applied per round.
        compression: sized by the model instead: cols = round(d / (compression · rows)), so the uplink
            is d / compression floats (overrides ``cols``).
        k_ratio: k = round(k_ratio · d) (overrides ``k``).
        momentum: ρ (0 = Count Sketch + error feedback).
        **kwargs: UpdateStrategy arguments; server_lr is η_s.
    """

    STATE_ATTRS = CompressedFedAvg.STATE_ATTRS + ("s_u", "s_e")  # momentum and error sketches

    def __init__(self, inner: Strategy | None = None, *, rows: int = 5, cols: int = 1000, k: int = 500,
                 compression: float | None = None, k_ratio: float | None = None, momentum: float = 0.9,
                 **kwargs: Any) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        kwargs.setdefault("error_feedback", "none")
        super().__init__(inner, codec="count_sketch", codec_params={"rows": rows, "cols": cols, "k": k}, **kwargs)
        if rows < 1 or cols < 1 or k < 1:
            raise ValueError(f"rows={rows}, cols={cols}, k={k}: all must be >= 1")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: ρ must be in [0, 1)")
        if compression is not None and not compression > 0:
            raise ValueError(f"compression={compression}: d / (rows · cols) must be > 0")
        if k_ratio is not None and not 0 < k_ratio <= 1:
            raise ValueError(f"k_ratio={k_ratio}: k/d must be in (0, 1]")
        self.rows, self.cols, self.k, self.rho = int(rows), int(cols), int(k), float(momentum)
        self.compression, self.k_ratio = compression, k_ratio
        self.sketch_seed = derive_seed(self.seed, "fetchsgd-hashes")
        self.s_u: torch.Tensor | None = None
        self.s_e: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    def round_seed_for(self, server_round: int) -> int:
        return self.sketch_seed  # one sketch (hashes) for every round

    def codec_params_for(self, dim: int) -> dict[str, Any]:
        cols = self.cols if self.compression is None else max(1, round(dim / (self.compression * self.rows)))
        k = self.k if self.k_ratio is None else max(1, round(self.k_ratio * dim))
        return {"rows": self.rows, "cols": int(cols), "k": int(k)}

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        super().round_config(server_round, config)
        config[keys.SEED_MODE] = "shared"

    def decodes_each(self) -> bool:
        return False  # combine works on the payloads themselves (compressed domain)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        d = self.global_vector.numel()
        codec = self.codec
        cs: CountSketch = codec.sketcher(self.sketch_seed)  # the clients' hashes, built once
        s_t = codec.aggregate([r.data for r in replies], weights.tolist()).tensors["table"].to(torch.float32)
        if self.s_u is None:
            self.s_u = torch.zeros_like(s_t)
            self.s_e = torch.zeros_like(s_t)
        self.s_u.mul_(self.rho).add_(s_t)  # step 3
        self.s_e.add_(self.server_lr * self.s_u)  # step 4
        before = float(self.s_e.norm())
        delta, idx = cs.unsketch_topk(self.s_e, min(codec.k, d))  # step 5
        cs.zero_coordinates(self.s_u, idx)  # step 6
        cs.zero_coordinates(self.s_e, idx)
        self._last = {
            "sketch_error_norm": float(self.s_e.norm()),
            "extracted_share": 1.0 - float(self.s_e.norm()) / before if before > 0 else 0.0,
            "update_nnz": int((delta != 0).sum()),
        }
        return delta.to(torch.float32)

    def server_update(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta  # η_s and ρ are applied in sketch space

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
