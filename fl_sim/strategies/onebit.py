"""OneBitCS: 1-bit quantized compressive sampling ([Mitra-Khisti-2020]), around any strategy.

Source: [Mitra-Khisti-2020] eqs. (9)-(10) and the "same Φ" note (docs/notes.md#mitra-khisti),
with the 1-bit dithered quantizer of [Abdi-thesis] eq. (4.5) in its unbiased form v̂ = ϱ(q/2 − u)
(docs/notes.md#qcs-1bit-erratum),
one scale ϱ_b per block.

Client i sends y_i = Q(Φ^(k) Δ_i): one bit per measurement plus one scale per block. Two variants:

* ``phi="per_worker"`` (eq. 9-10): worker k has its own Φ^(k); the server recovers each Δ̃_i and
  averages them (K recoveries);
* ``phi="common"`` (the paper's alternative): one Φ for everybody; the server averages the
  dequantized measurements and recovers once.

Φ is fixed a priori for the run (``phi_schedule="fixed"``, the paper: "Φ^(k) known a priori" at the
PS), or redrawn every round (``"round"``, an option). The dither u is every client's own and new
every round in both variants (``seed_mode="per_client"``, fl_sim.wire.protocol); ``seed_mode="shared"``
reproduces fl-sim's earlier rule (one u, and one Φ^(k), for all clients of a round).

Error feedback: off by default, as the paper ([Mitra-Khisti-2020] uses none). With ``recovery="none"`` the
decoded update is unbiased with relative variance ω = E‖x̂ − x‖²/‖x‖² = n/k − 1 plus the 1-bit
dither's m ρ²/12 / ‖v‖² (ρ = 2‖v‖∞ per block), which is well above 1 for any model update (measured
on LeNet-5's d = 61,706 at the default M = d/4: ω ≈ 24 with one block, 12 with blocks of 256). Classic
error feedback r ← z − ẑ then grows as E‖r_{t+1}‖² = ω‖z_t‖² ≥ ω‖r_t‖²: the residual is multiplied by
about √ω every round (×5-7 measured; loss 10³ by round 4 and NaN by round 5 in Flower's CNN examples),
so ``error_feedback="classic"`` with ``recovery="none"`` is refused. Error feedback needs a contractive
compressor (ω < 1, [Stich-2018], [Karimireddy-2019]); the sparse recoveries ("biht", "lp") are used with it
(configs/onebit_cs_compressive.yaml).

Regimes: M = d measurements with the adjoint recovery Φᵀv̂ (``recovery="none"``, unbiased), or the
paper's compressive regime M < d with sparse recovery (``recovery="biht"``, or ``"lp"`` = eq. (6)
for small blocks) and error feedback to carry what the K-sparse recovery drops
(configs/onebit_cs_compressive.yaml).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from fl_sim.compression import PayloadError, Seeds
from fl_sim.compression.codecs.sensing import ONEBIT_RECOVERIES, PHI_SCHEDULES
from fl_sim.rng import derive_seed
from fl_sim.strategies.base import ClientReply, ReplyError, payload_meta
from fl_sim.strategies.compressed import CompressedFedAvg
from fl_sim.wire import keys
from fl_sim.wire.records import summed_payload_from_records

__all__ = ["OneBitCS", "PHI_SCHEDULES"]

SUMMED = "secagg-sum"  # marks a reply's data that is already the round's weighted sum


class OneBitCS(CompressedFedAvg):
    """Mitra & Khisti's 1-bit QCS strategy.

    Args:
        measurements: M, one bit each (None: d / compression).
        compression: d/M when ``measurements`` is None.
        phi: "per_worker" or "common".
        phi_schedule: "fixed" (Φ / Φ^(k) drawn once for the run, the paper) or "round" (redrawn each round).
        recovery: "none" (Φᵀ v̂, unbiased), "biht" or "lp" (ℓ1 with ‖y − Φx‖∞ ≤ ε, small blocks).
        block: partition size n of the measurement operator (a power of 2; None = one block), with one
            scale ϱ_b per block.
        sparsity: K of BIHT / FIHT recovery.
        biht_iter: recovery iterations.
        error_feedback: "none" (default, the paper) or "classic" (only with a sparse recovery; refused with
            ``recovery="none"``, whose unbiased decode makes it diverge: module docstring).
        **kwargs: UpdateStrategy / CompressedFedAvg arguments (``seed_mode``).
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        measurements: int | None = None,
        compression: float = 4.0,
        phi: str = "per_worker",
        phi_schedule: str = "fixed",
        recovery: str = "none",
        block: int | None = None,
        sparsity: int | None = None,
        biht_iter: int | None = None,
        error_feedback: str = "none",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        if measurements is None and not (isinstance(compression, (int, float)) and math.isfinite(compression)
                                         and compression > 0):
            raise ValueError(f"compression={compression!r}: the ratio d/M must be a finite number > 0 "
                             "(or give measurements)")
        if phi not in ("per_worker", "common"):
            raise ValueError(f"phi={phi!r}: use 'per_worker' or 'common'")
        if recovery not in ONEBIT_RECOVERIES:
            raise ValueError(f"recovery={recovery!r}: use {', '.join(map(repr, ONEBIT_RECOVERIES))}")
        if phi_schedule not in PHI_SCHEDULES:
            raise ValueError(f"phi_schedule={phi_schedule!r}: use 'fixed' (the paper: Φ known a priori) or 'round'")
        if recovery == "none" and error_feedback == "classic":
            raise ValueError(
                "error_feedback='classic' with recovery='none' diverges: the unbiased 1-bit decode has relative "
                "variance well above 1 (about 24 at M = d/4), so the residual grows by its square root every round; "
                "use error_feedback='none' (the paper) or a sparse recovery ('biht', 'lp')")
        params: dict[str, Any] = {"phi": phi, "recovery": recovery}
        if block is not None:
            params["block"] = block
        if sparsity is not None:
            params["sparsity"] = sparsity
        if biht_iter is not None:
            params["biht_iter"] = biht_iter
        super().__init__(inner, codec="onebit_cs", codec_params=params, error_feedback=error_feedback, **kwargs)
        self.codec_params["phi_schedule"] = phi_schedule
        if phi_schedule == "fixed":
            self.codec_params["phi_seed"] = derive_seed(self.seed, "onebit_cs", "phi-a-priori")
        self.measurements = measurements
        self.compression = float(compression)
        self.phi = phi
        self.phi_schedule = phi_schedule

    def codec_params_for(self, dim: int) -> dict[str, Any]:
        m = self.measurements or max(1, int(round(dim / self.compression)))
        return {**self.codec_params, "measurements": int(m)}  # no per-tensor segments: one scale per block

    def decodes_each(self) -> bool:
        return self.phi != "common"  # "common": one recovery from the averaged measurements

    # Secure aggregation (fl_sim.strategies.secagg): with a common Φ the round's one reply may carry the
    # already-summed form Σ_i (n_i/n) aggregate_seeded([p_i]) (the clients' own dither removed before
    # masking); it is decoded as the sum it is.
    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        meta = payload_meta(msg)
        if self.phi != "common" or meta is None or "aggregated" not in json.loads(str(meta.get(keys.P_META, "{}"))):
            return super().decode_reply(server_round, msg, cid)
        try:
            payload = summed_payload_from_records(self.reply_arrays(msg), meta)
            self.codec.dequantize(payload, seed=self.round_seed)  # the summed form's shapes and finiteness
        except (PayloadError, ValueError) as exc:
            raise ReplyError(f"summed payload: {exc}") from None
        return (payload, SUMMED), int(payload.bits)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        summed = [r for r in replies if isinstance(r.data, tuple) and r.data[1:] == (SUMMED,)]
        if not summed:
            return super().combine(server_round, replies, weights)
        if len(replies) != 1:
            raise ValueError("a summed 1-bit CS payload (secure aggregation) must be the round's only reply")
        return self.codec.decode_seeded(summed[0].data[0], Seeds(self.round_seed)).to(torch.float32)
