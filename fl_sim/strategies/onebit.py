"""OneBitCS: 1-bit quantized compressive sampling (Mitra & Khisti 2020), around any strategy.

Source: shared/papers/000_2a9201d51a7b29c4.txt eqs. (9)-(10) and the "same Φ" note; NOTES.md §1,
with the 1-bit dithered quantizer of Abdi (eq. 4.5) and its erratum (unbiased v̂ = ϱ(q/2 − u)).

Client i sends y_i = Q(Φ^(k) Δ_i): one bit per measurement plus the scale ϱ. Two variants:

* ``phi="per_worker"`` (eq. 9-10): worker k has its own Φ^(k) (seed derived from the round seed
  and the client id); the server recovers each Δ̃_i and averages them (K recoveries);
* ``phi="common"`` (the paper's alternative): one Φ per round for everybody; the server averages
  the dequantized measurements and recovers once.

Optional client error feedback (classic EF) compensates the bias of sparse recovery.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import Strategy

from .base import ClientReply
from .compressed import CompressedFedAvg

__all__ = ["OneBitCS"]


class OneBitCS(CompressedFedAvg):
    """Mitra & Khisti's 1-bit QCS strategy.

    Args:
        measurements: M, one bit each (None: d / compression).
        compression: d/M when ``measurements`` is None.
        phi: "per_worker" or "common".
        recovery: "none" (Φᵀ v̂, unbiased), "biht" or "lp" (ℓ1 with ‖y − Φx‖∞ ≤ ε, small blocks).
        block: partition size n of the measurement operator (a power of 2; None = one block), with one
            scale ϱ per block.
        sparsity: K of BIHT recovery.
        error_feedback: "none" or "classic".
        **kwargs: UpdateStrategy arguments.
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        measurements: int | None = None,
        compression: float = 4.0,
        phi: str = "per_worker",
        recovery: str = "none",
        block: int | None = None,
        sparsity: int | None = None,
        error_feedback: str = "classic",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        if phi not in ("per_worker", "common"):
            raise ValueError(f"phi={phi!r}: use 'per_worker' or 'common'")
        params: dict[str, Any] = {"phi": phi, "recovery": recovery}
        if block is not None:
            params["block"] = block
        if sparsity is not None:
            params["sparsity"] = sparsity
        super().__init__(
            inner,
            codec="onebit_cs",
            codec_params=params,
            error_feedback=error_feedback,
            seed_mode="per_client" if phi == "per_worker" else "shared",
            **kwargs,
        )
        self.measurements = measurements
        self.compression = float(compression)
        self.phi = phi

    def codec_params_for(self, dim: int) -> dict[str, Any]:
        m = self.measurements or max(1, int(round(dim / self.compression)))
        return {**self.codec_params, "measurements": int(m)}

    def decodes_each(self) -> bool:
        return self.phi != "common"  # "common": one recovery from the averaged measurements

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        if self.phi == "common":
            summed = codec.aggregate([r.data for r in replies], weights.tolist())
            return codec.decode(summed, seed=self.round_seed).to(torch.float32)
        return super().combine(server_round, replies, weights)
