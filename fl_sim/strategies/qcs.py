"""QCS: quantized compressive sampling of the update with weighted error feedback ([Abdi-thesis] Ch. 4).

Source: [Abdi-thesis] Chapter 4; docs/notes.md#qcs.

Per block of n coordinates (Abdi's partitions), client i computes v = T z with the partial Hadamard
T = H R / sqrt(k) (eq. 4.1-4.2), dither-quantizes it to Q levels, q = ⌊v/ϱ + u⌉ with
ϱ = ‖v‖∞/Q (eq. 4.4), and sends q and ϱ. The server reproduces r and u from the round's shared
seed, dequantizes v̂ = ϱ(q − u) (eq. 4.6) and reconstructs ĝ = α Tᵀ v̂ (eq. 4.8), with α = 1
(unbiased, eq. 4.9) or α = 1/(γ+1) (MMSE, eq. 4.12), γ of Theorem 7 (eq. 4.10).

Client memory is Abdi's weighted error feedback (eq. 4.14): z = Δ + β r, r ← (1 − β) r + (z − ẑ),
with β defaulting to Remark 3's optimum: β* = 1/(γ+1) for unbiased QCS (eq. 4.17), β* = 1 for MMSE
QCS (eq. 4.18). Randomness (R, row subsets, dither) changes every round and is each
client's own (independent across clients, ``seed_mode="per_client"``, fl_sim.wire.protocol);
``seed_mode="shared"`` gives all clients of a round the same R, S and u (fl-sim's earlier rule:
their errors are then correlated and averaging does not shrink them).

Blocks follow the model's tensors (``granularity="tensor"``, Abdi's per-layer partitions): the strategy
passes the tensor lengths of the global model as the codec's ``segments`` every round.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import Strategy

from fl_sim.compression import make_codec
from fl_sim.compression.error_feedback import optimal_beta
from fl_sim.strategies.compressed import CompressedFedAvg

__all__ = ["QCS"]


class QCS(CompressedFedAvg):
    """Abdi's QCS around ``inner``: ``QCS(FedAdam(...), k=128, levels=4)``.

    The codec's parameters default to the ``qcs`` codec's own (one place: fl_sim.compression.codecs.qcs:
    block = min(256, d padded to a power of 2), k = 110 rows per 256-block, Q = 2; docs/notes.md#qcs-numbers).

    Args:
        inner: the aggregating strategy (None: FedAvg with ``**kwargs``).
        block: partition size n (a power of 2); None = the codec's default.
        k: rows of the Hadamard transform kept per block; None = the codec's default.
        levels: Q, the range of quantization levels; None = the codec's default.
        alpha: "unbiased" or "mmse"; None = the codec's default ("unbiased").
        granularity: "tensor" (blocks never straddle two tensors; Abdi's per-layer partitions) or
            "vector" (blocks of the flattened update); None = the codec's default ("tensor").
        error_feedback: "weighted" (default), "classic" or "none".
        beta: forgetting factor of weighted EF; None = Remark 3's β* (``optimal_beta``: 1/(γ+1) for
            unbiased QCS, eq. 4.17; 1 for MMSE, eq. 4.18), γ of Theorem 7 for the codec in use.
        **kwargs: UpdateStrategy arguments.
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        block: int | None = None,
        k: int | None = None,
        levels: float | None = None,
        alpha: str | None = None,
        granularity: str | None = None,
        error_feedback: str = "weighted",
        beta: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        given = {"block": block, "k": k, "levels": levels, "alpha": alpha, "granularity": granularity}
        params = {name: v for name, v in given.items() if v is not None}
        make_codec("qcs", dim=block or 256, **params)  # validates the parameters now, not in round 1
        self.beta = beta
        super().__init__(inner, codec="qcs", codec_params=params, error_feedback=error_feedback,
                         ef_beta=1.0 if beta is None else beta, **kwargs)

    @property
    def gamma(self) -> float:
        """γ of Theorem 7 (eq. 4.10) for this round's codec."""
        return float(self.codec.gamma)

    def round_config(self, server_round, config) -> None:
        if self.beta is None:
            self.ef_beta = optimal_beta(self.gamma, self.codec.alpha)
        super().round_config(server_round, config)

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return {"qcs_gamma": self.gamma, "ef_beta": self.ef_beta}

