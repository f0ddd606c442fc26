"""QCS: quantized compressive sampling of the update with weighted error feedback (Abdi, Ch. 4).

Source: shared/papers/002_5a8bb245d2c84ca1.txt Chapter 4; NOTES.md §3.1.

Per block of n coordinates (Abdi's partitions), client i computes v = T z with the partial Hadamard
T = H R / sqrt(k) (eq. 4.1-4.2), dither-quantizes it to Q levels, q = ⌊v/ϱ + u⌉ with
ϱ = ‖v‖∞/Q (eq. 4.4), and sends q and ϱ. The server reproduces r and u from the round's shared
seed, dequantizes v̂ = ϱ(q − u) (eq. 4.6) and reconstructs ĝ = α Tᵀ v̂ (eq. 4.8), with α = 1
(unbiased, eq. 4.9) or α = 1/(γ+1) (MMSE, eq. 4.12), γ of Theorem 7 (eq. 4.10).

Client memory is Abdi's weighted error feedback (eq. 4.14): z = Δ + β r, r ← (1 − β) r + (z − ẑ),
with β defaulting to Remark 3's optimum: β* = 1/(γ+1) for unbiased QCS (eq. 4.17), β* = 1 for MMSE
QCS (eq. 4.18). Randomness (R, row subsets, dither) changes every round and is each
client's own (independent across clients, ``seed_mode="per_client"``, fl_sim.protocol);
``seed_mode="shared"`` gives all clients of a round the same R, S and u (fl-sim before issue 12:
their errors are then correlated and averaging does not shrink them).

Blocks follow the model's tensors (``granularity="tensor"``, Abdi's per-layer partitions): the strategy
passes the tensor lengths of the global model as the codec's ``segments`` every round.
"""

from __future__ import annotations

from typing import Any

from .compressed import CompressedFedAvg

__all__ = ["QCS"]


class QCS(CompressedFedAvg):
    """Abdi's QCS strategy.

    Args:
        block: partition size n (a power of 2).
        k: rows of the Hadamard transform kept per block.
        levels: Q, the range of quantization levels.
        alpha: "unbiased" or "mmse".
        granularity: "tensor" (blocks never straddle two tensors; default, Abdi's per-layer partitions)
            or "vector" (blocks of the flattened update).
        error_feedback: "weighted" (default), "classic" or "none".
        beta: forgetting factor of weighted EF; None = Remark 3's β*.
        **kwargs: UpdateStrategy arguments.
    """

    def __init__(
        self,
        *,
        block: int = 256,
        k: int = 64,
        levels: float = 2,
        alpha: str = "unbiased",
        granularity: str = "tensor",
        error_feedback: str = "weighted",
        beta: float | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        params = {"block": block, "k": k, "levels": levels, "alpha": alpha, "granularity": granularity}
        from ..compression import make_codec

        probe = make_codec("qcs", dim=block, **params)  # validates the parameters early, gives γ
        self.granularity = granularity
        self.gamma = float(probe.gamma)
        if beta is None:
            beta = 1.0 if alpha == "mmse" else 1.0 / (self.gamma + 1.0)
        super().__init__(codec="qcs", codec_params=params, error_feedback=error_feedback, ef_beta=beta, **kwargs)

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return {"qcs_gamma": self.gamma, "ef_beta": self.ef_beta}

