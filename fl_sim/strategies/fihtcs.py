"""FIHTCS: compressed-sensing uplink with FIHT recovery and server error feedback (Tang et al.).

Source: [Tang-FIHT] (slides; docs/notes.md#tang-fiht); FIHT's steps from the authors' public code
(docs/notes.md#tang-fiht-steps).

One "for-all" sensing matrix Φ = sqrt(d/Q)·(Q random rows of the DCT or WHT) is drawn once from the
run seed and used by every client in every round (clients hold no state). Round t:

1. client i sends y_i = Φ Δ_i (Q floats: ``cs_fiht`` codec);
2. server averages in measurement space: ȳ = Σ_i (n_i/n) y_i  (= Φ Δ̄ by linearity);
3. error feedback at the server: p = η_s Δ̄ + e, formed as Φp = η_s ȳ + Φe;
4. recovery: Δ = FIHT(Φp; Φ, K) with at most K nonzeros (the modified FIHT of
   ``fl_sim.compression.recovery.fiht``: sparsity continuation and a relative-decrease stop, options
   ``start`` / ``min_decrease``; both None give the authors' FIHT.py schedule);
5. e ← p − Δ; the inner strategy gets w + Δ from every client (FedAvg: w ← w + Δ).

Because e is only ever used through Φe, the server keeps r = Φe (Q floats) in measurement space,
exactly as the reference code: r ← Φp − ΦΔ. The server cannot see Δ̄ itself, so the recovery error it
reports is the measurement residual ‖Φp − ΦΔ‖ / ‖Φp‖.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import Strategy

from fl_sim.wire import keys
from fl_sim.compression import make_codec
from fl_sim.rng import derive_seed
from fl_sim.strategies.base import ClientReply
from fl_sim.strategies.compressed import CompressedFedAvg

__all__ = ["FIHTCS", "TANG_SPARSITY_RATIO"]

# Tang et al.: K = 30,000 nonzeros for the CIFAR-10 ResNet of d = 668,426 parameters.
TANG_SPARSITY_RATIO = 30_000 / 668_426


class FIHTCS(CompressedFedAvg):
    """Tang et al.'s CS-SGD with FIHT and server-side error feedback.

    Args:
        compression: d/Q (used when ``measurements`` is None).
        measurements: Q, the number of measurements each client sends.
        sparsity: K, nonzeros recovered per round (None: ``sparsity_ratio`` x d).
        sparsity_ratio: K/d (default Tang's 30,000/668,426).
        transform: "dct" or "wht".
        max_iter: FIHT iterations.
        tol: FIHT's relative residual tolerance (default 1e-6, the reference's precision on exactly
            sparse vectors; ``fl_sim.compression.recovery.fiht``).
        start: first sparsity level of the modified FIHT's continuation, a fraction of Q (default 1/128);
            None: K from the start, as the authors' FIHT.py.
        min_decrease: the modified FIHT's relative-decrease stopping rule (default 0.1); None: off, as
            FIHT.py. ``start: null, min_decrease: null`` in a config gives the reference schedule.
        **kwargs: UpdateStrategy arguments (server_lr is η_s).
    """

    STATE_ATTRS = CompressedFedAvg.STATE_ATTRS + ("residual",)  # server error r = Φe

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        compression: float = 10.0,
        measurements: int | None = None,
        sparsity: int | None = None,
        sparsity_ratio: float = TANG_SPARSITY_RATIO,
        transform: str = "dct",
        max_iter: int = 25,
        tol: float = 1e-6,
        start: float | None = 1 / 128,
        min_decrease: float | None = 0.1,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        kwargs.setdefault("error_feedback", "none")  # error feedback is on the server here
        super().__init__(inner, codec="cs_fiht", codec_params={}, **kwargs)
        if compression <= 1 and measurements is None:
            raise ValueError(f"compression={compression}: d/Q must be > 1")
        if not max_iter >= 1:
            raise ValueError(f"max_iter={max_iter}: FIHT needs at least 1 iteration")
        if transform not in ("dct", "wht"):
            raise ValueError(f"transform={transform!r}: use 'dct' or 'wht'")
        if not 0 < sparsity_ratio <= 1:
            raise ValueError(f"sparsity_ratio={sparsity_ratio}: K/d must be in (0, 1]")
        self.compression = float(compression)
        self.measurements = measurements
        self.sparsity = sparsity
        self.sparsity_ratio = float(sparsity_ratio)
        self.transform = transform
        self.max_iter = int(max_iter)
        self.fiht_options = {"tol": tol, "start": start, "min_decrease": min_decrease}
        make_codec("cs_fiht", dim=2, measurements=1, **self.fiht_options)  # bad options fail here, not in round 1
        self.phi_seed = derive_seed(self.seed, "fihtcs-phi")  # one Φ for all clients and rounds
        self.residual: torch.Tensor | None = None  # r = Φe, Q floats

    def codec_params_for(self, d: int) -> dict[str, Any]:
        q = self.measurements or max(1, int(round(d / self.compression)))
        k = self.sparsity or max(1, int(round(self.sparsity_ratio * d)))
        if q > d:
            raise ValueError(f"measurements Q={q} exceeds the model dimension d={d}")
        return {"measurements": int(q), "sparsity": int(min(k, q)), "transform": self.transform,
                "max_iter": self.max_iter, **self.fiht_options}

    def round_seed_for(self, server_round: int) -> int:
        return self.phi_seed  # one Φ for all clients and rounds

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        super().round_config(server_round, config)
        config[keys.SEED_MODE] = "shared"

    def decodes_each(self) -> bool:
        return False  # combine works on the payloads themselves (compressed domain)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        y_bar = codec.aggregate([r.data for r in replies], weights.tolist()).tensors["y"].to(torch.float32)
        if self.residual is None:
            self.residual = torch.zeros_like(y_bar)
        phi_p = self.server_lr * y_bar + self.residual  # step 3: Φp = η_s ȳ + Φe
        delta = codec.recover(phi_p, seed=self.phi_seed)  # step 4
        self.residual = phi_p - codec.measure(delta, seed=self.phi_seed)  # step 5: r ← Φp − ΦΔ
        norm = float(phi_p.norm())
        self._last = {
            "recovery_residual": float(self.residual.norm()) / norm if norm > 0 else 0.0,
            "ef_residual_norm": float(self.residual.norm()),
            "update_nnz": int((delta != 0).sum()),
        }
        return delta

    def server_update(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta  # η_s is already inside p

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
