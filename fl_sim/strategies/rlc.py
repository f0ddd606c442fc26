"""RLCOverTheAir: random linear coding with analog over-the-air aggregation (Abdi, Ch. 5).

Source: shared/papers/002_5a8bb245d2c84ca1.txt Chapter 5 (eqs. 5.1-5.11, Lemmas 12-14); NOTES.md §3.2.

Every participating client encodes its weighted update with the common A = H R / sqrt(m)
(eq. 5.3; A drawn from the round seed, changed every ``refresh`` rounds) and transmits

    x_i = c α_i (b_i/π_i) (m/m_i) (q_i ⊙ (A Δ_i))                                   (eq. 5.10)

over the multiple-access channel y = Σ_i h_i ⊙ x_i + η (eq. 5.1): channel inversion q_i on the
subchannels node i selected (eq. 5.6), global power scale c (eq. 5.7-5.8), Bernoulli participation
b_i ~ Bernoulli(π_i). The server sees only y and decodes Δ̂ = Aᵀ y / c (eq. 5.4, Lemma 14).

Simulation note: the clients return their codewords A Δ_i (the ``rlc`` codec payload); the strategy
itself plays the channel (fl_sim.channels.MACChannel) and decodes from the superposition only. The
per-client codewords are used by nothing but the channel simulation, and, for diagnostics only, the
channel-induced MSE of Δ̂ against Aᵀ A Σ α_i Δ_i, the decode over a perfect channel (the server never
sees Δ_i itself, so the (d/m − 1)‖g‖² part of Lemma 13 is not measurable here; the unit tests of
fl_sim.channels check it).

Channel uses: m per round, whatever the number of nodes. Latency per round = client compute time
+ m / bandwidth (symbols per second).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord

from .. import keys
from ..channels import MACChannel
from ..rng import derive_seed
from .base import ClientReply
from .compressed import CompressedFedAvg

__all__ = ["RLCOverTheAir"]


class RLCOverTheAir(CompressedFedAvg):
    """Abdi's RLC over-the-air FL.

    Args:
        gain: compression gain d/m (used when ``m`` is None); the thesis uses 2, 5, 20, 100.
        m: channel symbols per round.
        refresh: rounds between changes of A (Lemma 12 text: A must change every few iterations).
        channel: MACChannel configuration mapping (snr_db, fading, participation, ...).
        bandwidth_hz: symbol rate that turns channel uses into seconds.
        compute_s: per-round local compute time added to the latency.
        error_feedback: "none", or "classic" for the Remark 6 variant with client-side memory.
        **kwargs: UpdateStrategy arguments.
    """

    def __init__(
        self,
        *,
        gain: float = 20.0,
        m: int | None = None,
        refresh: int = 1,
        channel: dict[str, Any] | None = None,
        bandwidth_hz: float = 1e6,
        compute_s: float = 0.0,
        error_feedback: str = "none",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        super().__init__(codec="rlc", codec_params={}, error_feedback=error_feedback, **kwargs)
        if gain < 1 and m is None:
            raise ValueError(f"gain={gain}: the compression gain d/m must be >= 1")
        if refresh < 1:
            raise ValueError(f"refresh={refresh} must be >= 1")
        if bandwidth_hz <= 0 or compute_s < 0:
            raise ValueError(f"bandwidth_hz={bandwidth_hz} must be > 0 and compute_s={compute_s} >= 0")
        self.gain = float(gain)
        self.m = m
        self.refresh = int(refresh)
        self.channel = MACChannel.from_config(dict(channel or {}), seed=self.seed)
        self.bandwidth_hz = float(bandwidth_hz)
        self.compute_s = float(compute_s)
        self._last: dict[str, float] = {}

    @classmethod
    def from_experiment(cls, exp) -> dict[str, Any]:
        channel = dict(exp.cfg.channel)
        out: dict[str, Any] = {k: channel.pop(k) for k in ("bandwidth_hz", "compute_s") if k in channel}
        return {"channel": channel, **out}

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        d = self._global_vector.numel()
        m = self.m or max(1, int(round(d / self.gain)))
        self.codec_params = {"m": int(m)}
        self._round_seed = derive_seed(self.seed, "rlc-A", (server_round - 1) // self.refresh)
        super().round_config(server_round, config)
        config[keys.SEED] = self._round_seed
        config[keys.SEED_MODE] = "shared"

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codec = self.codec_for(self._global_vector.numel())
        codewords = torch.stack([r.data.tensors["y"].to(torch.float32) for r in replies])  # (K, m): A Δ_i
        cids = [r.cid for r in replies]
        y_over_c, chan = self.channel.over_the_air(codewords, weights.to(torch.float32), round=server_round, node_ids=cids)
        summed = codec.aggregate([replies[0].data], [1.0])
        summed.tensors["y"] = y_over_c.to(summed.tensors["y"].dtype)
        delta = codec.decode(summed, seed=self._round_seed).to(torch.float32)  # Δ̂ = Aᵀ y / c
        # Diagnostics only: the channel-free decode Aᵀ A Σ α_i Δ_i (what Δ̂ would be over a perfect MAC);
        target = codec.decode(codec.aggregate([r.data for r in replies], weights.tolist()), seed=self._round_seed)
        mse = float(((delta - target) ** 2).sum())
        m = codewords.shape[1]
        self._last = {
            "channel_uses": m,
            "latency_s": self.compute_s + m / self.bandwidth_hz,
            "rlc_channel_mse": mse,
            "rlc_channel_rel_mse": mse / max(float((target**2).sum()), 1e-30),
            **{f"chan_{k}": float(v) for k, v in chan.items() if isinstance(v, (int, float))},
        }
        return delta

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
