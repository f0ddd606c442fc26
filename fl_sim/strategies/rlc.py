"""RLCOverTheAir: random linear coding with analog over-the-air aggregation ([Abdi-thesis] Ch. 5).

Source: [Abdi-thesis] Chapter 5 (eqs. 5.1-5.11, Lemmas 12-14, Remark 6); docs/notes.md#rlc.

Every sampled client encodes its update Δ_i with the common A = H R / sqrt(m) (eq. 5.3; A drawn
from a seed of the round block, changed every ``refresh`` rounds) and transmits

    x_i = c α_i (b_i/π_i) (m/m_i) (q_i ⊙ (A Δ_i))                                   (eq. 5.10)

over the multiple-access channel y = Σ_i h_i ⊙ x_i + η (eq. 5.1): channel inversion q_i on the
subchannels node i selected (eq. 5.6), global power scale c (eqs. 5.7-5.8), Bernoulli participation
b_i ~ Bernoulli(π_i) drawn by the channel, α_i = n_i/n over the sampled clients. The server sees only
y and decodes Δ̂ = Aᵀ Re(y) / c (eq. 5.4, Lemma 14).

Simulation split: the clients return their codewords v_i = A Δ_i (the ``rlc`` codec payload, made by
``compression_mod``); the strategy plays the channel (fl_sim.channels.MACChannel: fading, CSI, power
control, participation, noise) and decodes from the noisy superposition only. The codewords are used
by nothing but the channel simulation and, for diagnostics only, the channel-induced error
‖Δ̂ − Aᵀ Σ_i α_i (b_i/π_i) v_i‖², i.e. against Aᵀ A Σ α_i (b_i/π_i) Δ_i, the decode of a perfect MAC
with the same transmitting nodes: fading, CSI error, subchannel selection, noise (and Remark 6
clipping). Not in it: the projection part (d/m − 1)‖g‖² of Lemma 13 (the server never holds Δ_i)
and the participation part (known in closed form, docs/notes.md#rlc-participation); fl_sim.channels' tests check both.

Power control needs each node's ‖Δ_i‖ (a_i of eq. 5.8); a real node knows it. By default the
simulation uses ‖A Δ_i‖ (E‖AΔ‖² = ‖Δ‖²). With ``diagnostics=True`` the round config asks clients to
report the scalar ‖Δ_i‖ as the metric ``update-norm`` (the one scalar a node reports for c); when
every reply carries it, power control uses the true norms, so S_i and c do not depend on A.

Downlink (eq. 5.1 text, ŷ_i = y + η'_i): with ``downlink_snr_db`` in the channel, the broadcast of
round t−1's aggregate reaches each node with its own noise, so client i starts round t from
w_t + η_s Aᵀ η'_i instead of w_t (nodes are assumed to hold w_{t−1} exactly; the accumulation of
downlink noise over many rounds is not modelled). Its clients then send Δ_i relative to that copy.

Remark 6 (``variant="remark6"``, eq. 5.11): x_i = s_i (q_i ⊙ (A z_i)) with a local constant s_i and
memory e_i = z_i − (1/c) Aᵀ x_i. Node i picks s_i = ρ_i · c α_i (b_i/π_i)(m/m_i) with
ρ_i = min(1, sqrt(P_i)/‖x_i^unbiased‖): it sends the unbiased amount when its budget allows and
otherwise scales down so that its *realized* power is exactly P_i (the unbiased rule meets P_i only
in expectation over A). The memory is split in two parts that add up to e_i:
  * compression part z_i − Aᵀ A z_i: the client's weighted error feedback ([Abdi-thesis] eq. 4.14, the "local
    weighted error feedback" of [53] that Remark 6 cites) in ``compression_mod``, β = m/n by default
    (Remark 3's β* = 1/(γ+1) with γ = n/m − 1, n = d padded to a power of 2). Classic EF (β = 1) is
    not used: Aᵀ A expands by n/m on average, so r ← z − Aᵀ A z grows without bound for n/m > 2;
  * channel part (1 − ρ_i)(m/m_i) Aᵀ (D_i v'_i) (D_i = selected subchannels, v'_i the node's codeword
    incl. its earlier channel memory): what clipping withheld. A node computes it from its own signal;
    the simulation holds it at the server (it is the only place where ρ_i is known), keyed by client
    id, and adds A e_i to that node's next codeword (linear, so identical to the node encoding
    z_i + e_i). Only clipped nodes hold one.
``c_gain`` multiplies the c of the unbiased power control (default 1: clipping only where the
realized power would exceed P_i; > 1 trades clipping for less noise).

Channel uses: m per round, whatever the number of nodes. Latency per round = compute_s + m /
bandwidth_hz (symbols per second).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from fl_sim.wire import keys
from fl_sim.channels import REAL_NOISE_FRACTION, MACChannel, draw_participation, form_signals
from fl_sim.compression.error_feedback import optimal_beta
from fl_sim.wire.records import unflatten_into
from fl_sim.rng import derive_seed
from fl_sim.strategies.base import ClientReply, ReplyError
from fl_sim.strategies.compressed import CompressedFedAvg

__all__ = ["RLCOverTheAir", "REPORT_NORM", "M_UPDATE_NORM", "VARIANTS"]

VARIANTS = ("unbiased", "remark6")
REPORT_NORM = keys.REPORT_NORM  # ConfigRecord: ask clients for ‖Δ_i‖ (diagnostics)
M_UPDATE_NORM = keys.UPDATE_NORM  # MetricRecord: the client's ‖Δ_i‖ (or ‖z_i‖ with error feedback)


class RLCOverTheAir(CompressedFedAvg):
    """Abdi's RLC over-the-air FL (eq. 5.10 transmitter, Lemma 14 decoder Δ̂ = Aᵀ Re(y)/c).

    Symbols: d model size, m = round(d / gain) channel uses per round, A = H R / sqrt(m) (m x d),
    α_i = n_i / n over the sampled clients, b_i ~ Bernoulli(π_i), h_i fading, ĥ_i its estimate,
    q_i = 1/ĥ_i on the m_i selected subchannels, c the global power scale, P_i = m p_i the budget.

    Args:
        gain: compression gain d/m (used when ``m`` is None); the thesis uses 2, 5, 20, 100.
        m: channel symbols per round (overrides ``gain``).
        refresh: rounds between changes of A (Lemma 12 text: A must change every few iterations).
        channel: MACChannel configuration mapping (snr_db, fading, participation, power, ...).
        bandwidth_hz: symbol rate that turns channel uses into seconds.
        compute_s: per-round local compute time added to the latency.
        variant: "unbiased" (eq. 5.10) or "remark6" (eq. 5.11, local scaling + error feedback).
        c_gain: remark6 only: c = c_gain x the unbiased power-control c (>= 1).
        diagnostics: ask clients for ‖Δ_i‖ (metric ``update-norm``) and use it for power control.
        client_sizes: n_i of every client id (list indexed by id; set from the experiment): the static
            weights α_i = n_i / Σ_sampled n_j, known to all nodes as in the thesis's F = Σ α_i f_i.
        skip_idle: with ``client_sizes``, draw b_i before the round and train only the nodes that
            will transmit (b_i is the node's own coin, drawn before it computes; the channel redraws
            the same b_i from the same keys). Without sizes every sampled node is asked.
        error_feedback: client memory ("none", "classic", "weighted"); None = "none" for "unbiased",
            "weighted" for "remark6".
        ef_beta: weighted-EF factor; None = m/n (Remark 3's β*, n = d padded to a power of 2).
        **kwargs: UpdateStrategy arguments.
    """

    # remark6 channel memory e_i (by client id) and the last broadcast (downlink noise of the next round)
    STATE_ATTRS = CompressedFedAvg.STATE_ATTRS + ("_memory", "_broadcast")

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        gain: float = 20.0,
        m: int | None = None,
        refresh: int = 1,
        channel: dict[str, Any] | None = None,
        bandwidth_hz: float = 1e6,
        compute_s: float = 0.0,
        variant: str = "unbiased",
        c_gain: float = 1.0,
        diagnostics: bool = False,
        client_sizes: Sequence[int] | None = None,
        skip_idle: bool = True,
        error_feedback: str | None = None,
        ef_beta: float | None = None,
        **kwargs: Any,
    ) -> None:
        for fixed in ("codec", "codec_params"):  # RLC needs the rlc codec (its A is common by the codec's contract)
            kwargs.pop(fixed, None)
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r}: use one of {', '.join(VARIANTS)}")
        if error_feedback is None:
            error_feedback = "weighted" if variant == "remark6" else "none"
        super().__init__(inner, codec="rlc", codec_params={}, error_feedback=error_feedback,
                         ef_beta=1.0 if ef_beta is None else ef_beta, **kwargs)
        if m is None and not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain >= 1):
            raise ValueError(f"gain={gain}: the compression gain d/m must be a finite number >= 1")
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"m={m!r}: the channel uses per round must be an int >= 1")
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"refresh={refresh!r} must be an int >= 1 (rounds between changes of A)")
        if not (bandwidth_hz > 0 and math.isfinite(bandwidth_hz)) or not (compute_s >= 0 and math.isfinite(compute_s)):
            raise ValueError(f"bandwidth_hz={bandwidth_hz} must be > 0 and compute_s={compute_s} >= 0")
        if not (math.isfinite(c_gain) and c_gain >= 1):
            raise ValueError(f"c_gain={c_gain}: must be a finite number >= 1")
        if c_gain != 1 and variant != "remark6":
            raise ValueError("c_gain only applies to variant 'remark6' (the unbiased scheme must meet every budget)")
        self.gain = float(gain)
        self.m = m
        self.refresh = refresh
        self.channel = MACChannel.from_config(dict(channel or {}), seed=self.seed)
        self.bandwidth_hz = float(bandwidth_hz)
        self.compute_s = float(compute_s)
        self.variant = variant
        self.c_gain = float(c_gain)
        self.diagnostics = bool(diagnostics)
        self.client_sizes = None if client_sizes is None else [int(n) for n in client_sizes]
        if self.client_sizes is not None and any(n < 0 for n in self.client_sizes):
            raise ValueError("client_sizes must be counts >= 0 (one per client id)")
        self.skip_idle = bool(skip_idle)
        self._sampled_n = 0  # Σ n_j over the clients sampled this round (idle ones included)
        self._auto_beta = ef_beta is None
        self._memory: dict[int, torch.Tensor] = {}  # remark6 channel memory e_i (clipped nodes only)
        self._broadcast: tuple[int, torch.Tensor, int] | None = None  # (A seed, Re(y)/c, round) of the last round
        self._downlink_mse = float("nan")
        self._last: dict[str, float] = {}

    @classmethod
    def from_experiment(cls, exp) -> dict[str, Any]:
        channel = dict(exp.cfg.channel)
        out: dict[str, Any] = {k: channel.pop(k) for k in ("bandwidth_hz", "compute_s") if k in channel}
        return {"channel": channel, "client_sizes": exp.data.client_sizes.tolist(), **out}

    # ------------------------------------------------------------------ round set-up
    def symbols(self, d: int) -> int:
        """m for a model of d parameters: ``m``, or round(d / gain) (at least 1)."""
        return self.m or max(1, int(round(d / self.gain)))

    def matrix_seed(self, server_round: int) -> int:
        """Seed of A in this round: one per block of ``refresh`` rounds."""
        return derive_seed(self.seed, "rlc-A", (server_round - 1) // self.refresh)

    def codec_params_for(self, dim: int) -> dict[str, Any]:
        return {"m": int(self.symbols(dim))}

    def round_seed_for(self, server_round: int) -> int:
        return self.matrix_seed(server_round)

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        if self._auto_beta:  # Remark 3's β* = 1/(γ+1), γ = n/m − 1 the projection's MSE factor (Lemma 13)
            self.ef_beta = optimal_beta(self.codec.mse_factor)
        super().round_config(server_round, config)
        if self.diagnostics:
            config[REPORT_NORM] = True

    def finish_messages(self, server_round: int, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        """Only the nodes that will transmit are asked (``skip_idle``); downlink noise per node."""
        self._downlink_mse = float("nan")
        sampled = list(self.sent)  # client ids, same order as the messages
        if self.client_sizes is not None:
            self._sampled_n = sum(self.client_sizes[c] for c in sampled)
            if self.skip_idle and messages:
                b = draw_participation(self.channel.probabilities(sampled), seed=self.channel.seed,
                                       round=server_round, nodes=sampled)
                messages = [msg for msg, on in zip(messages, b.tolist()) if on]
                self.sent = {c: n for (c, n), on in zip(self.sent.items(), b.tolist()) if on}
        if self._broadcast is None or self.channel.downlink_snr_db is None or not messages:
            return messages
        # Each node decodes its own noisy copy of the last broadcast: w + η_s Aᵀ η'_i (module docstring).
        a_seed, y_prev, round_prev = self._broadcast
        cids = list(self.sent)  # same order as the messages
        noisy = self.channel.downlink(y_prev, cids, round=round_prev)
        perturb = self.server_lr * self.codec.operator(a_seed).adjoint(noisy - y_prev).to(torch.float32)  # (K, d)
        self._downlink_mse = float((perturb.to(torch.float64) ** 2).sum(dim=1).mean())
        for msg, p in zip(messages, perturb):
            msg.content[self.arrayrecord_key] = unflatten_into(arrays, self.global_vector + p)
        return messages

    # ------------------------------------------------------------------ replies
    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        payload, bits = super().decode_reply(server_round, msg, cid)
        norm = None
        _, metrics = self.reply_metrics(msg)
        if self.diagnostics and M_UPDATE_NORM in metrics:
            norm = float(metrics[M_UPDATE_NORM])
            if not (math.isfinite(norm) and norm >= 0):
                raise ReplyError(f"metric {M_UPDATE_NORM!r} = {norm} is not a finite norm >= 0")
        return (payload, norm), bits

    # reply guards (fl_sim.strategies.guards): the reported ‖Δ_i‖ sets the power scale c of every node
    def reply_scalars(self, reply: ClientReply) -> dict[str, float]:
        norm = reply.data[1]
        return {} if norm is None else {f"metric {M_UPDATE_NORM!r}": norm}

    def scale_reply(self, reply: ClientReply, factor: float) -> None:
        super().scale_reply(reply, factor)
        payload, norm = reply.data
        reply.data = (payload, None if norm is None else norm * factor)

    def _adjoint(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Aᵀ y (the rlc codec's decoder, eq. 5.4) for the operator of ``seed``."""
        return self.codec.operator(seed).adjoint(y).to(torch.float32)

    # ------------------------------------------------------------------ aggregation
    def empty_round_metrics(self, server_round: int) -> dict[str, float]:
        """Nobody transmitted (idle nodes skipped, or every reply rejected): m channel uses all the same."""
        d = self.global_vector.numel()
        m = self.symbols(d)
        self._broadcast = None
        extra = {"channel_uses": float(m), "latency_s": self.compute_s + m / self.bandwidth_hz, "rlc_m": float(m),
                 "rlc_gain": d / m, "rlc_c": 0.0, "rlc_transmitting": 0.0, "rlc_noise_mse_expected": 0.0,
                 "rlc_downlink_mse": self._downlink_mse}
        if self.channel.snr_db is not None:
            extra["snr_db"] = float(self.channel.snr_db)
        return extra

    def decodes_each(self) -> bool:
        return False  # combine works on the payloads themselves (compressed domain)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codewords = torch.stack([self.payload_tensor(r.data[0]).to(torch.float32) for r in replies])  # (K, m): A Δ_i
        cids = [r.cid for r in replies]
        norms = [r.data[1] for r in replies]
        true_norms = self.diagnostics and all(n is not None for n in norms)
        if self.client_sizes is not None and self._sampled_n > 0:  # α_i = n_i / Σ_sampled n_j
            alpha = torch.tensor([self.client_sizes[c] for c in cids], dtype=torch.float64) / self._sampled_n
        else:
            alpha = weights.to(torch.float64)
        if self.variant == "remark6":
            y_dec, chan = self._remark6_round(server_round, codewords, alpha, cids)
        else:
            y_dec, chan = self.channel.over_the_air(
                codewords, alpha, round=server_round, node_ids=cids,
                norms=torch.tensor(norms, dtype=torch.float64) if true_norms else None,
            )
        delta = self._adjoint(y_dec, self.round_seed)  # Δ̂ = Aᵀ Re(y) / c
        self._broadcast = (self.round_seed, y_dec.to(torch.float32), server_round) if chan["c"] > 0 else None
        # Diagnostics only (simulation): the error the MAC adds (fading, CSI, subchannel selection,
        # noise, clipping), against a perfect MAC's decode of the same transmitters Aᵀ Σ α_i (b_i/π_i) v_i.
        coef = alpha * chan["b"].to(torch.float64) / self.channel.probabilities(cids)
        target = self._adjoint((coef @ codewords.to(torch.float64)).to(torch.float32), self.round_seed)
        mse = float(((delta - target).to(torch.float64) ** 2).sum())
        target2 = max(float((target.to(torch.float64) ** 2).sum()), 1e-30)
        d, m = self.global_vector.numel(), codewords.shape[1]
        transmitting = chan["b"].to(torch.bool)
        ratio = (chan["power"] / chan["budget"])[transmitting]
        self._last = {
            "channel_uses": float(m),
            "latency_s": self.compute_s + m / self.bandwidth_hz,
            "rlc_m": float(m),
            "rlc_gain": d / m,
            "rlc_c": float(chan["c"]),
            "rlc_transmitting": float(chan["transmitting"]),
            "rlc_mean_m_i": float(chan["mean_m_i"]),
            "rlc_power_ratio_max": float(ratio.max()) if ratio.numel() else 0.0,
            "rlc_power_ratio_mean": float(ratio.mean()) if ratio.numel() else 0.0,
            "rlc_expected_power_ratio_max": float(chan["expected_power_ratio_max"]),
            "rlc_noise_var": float(chan["noise_var"]),
            "rlc_noise_mse_expected": d * float(chan["decoded_noise_var"]),
            "rlc_noise_rel_mse_expected": d * float(chan["decoded_noise_var"]) / target2,
            "rlc_channel_mse": mse,
            "rlc_channel_rel_mse": mse / target2,
            "rlc_true_norms": float(true_norms),
            "rlc_downlink_mse": self._downlink_mse,
        }
        if "snr_db" in chan:
            self._last["snr_db"] = float(chan["snr_db"])
        if self.variant == "remark6":
            self._last["rlc_clipped"] = float(chan["clipped"])
            self._last["rlc_memory_nodes"] = float(len(self._memory))
        return delta

    def _remark6_round(
        self, server_round: int, codewords: torch.Tensor, alpha: torch.Tensor, cids: list[int]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Eq. 5.11 with local scaling s_i and the channel part of the memory (module docstring), on the
        channel's own steps (draws, power plan, reception) with the clipping of Remark 6 in between."""
        ch = self.channel
        k_nodes, m = codewords.shape
        h, h_est, pi, b = ch.round_draws(cids, m, round=server_round)
        b = b.to(torch.float64)
        coef = alpha * b / pi
        # v'_i = α_i (b_i/π_i) A z_i + b_i A e_i: the node's fresh contribution plus its channel memory.
        op = self.codec.operator(self.round_seed)
        held = [j for j, cid in enumerate(cids) if b[j] > 0 and cid in self._memory]
        mem = torch.zeros(k_nodes, m, dtype=torch.float64)
        if held:
            mem[held] = op.forward(torch.stack([self._memory[cids[j]] for j in held])).to(torch.float64)
        w = coef[:, None] * codewords.to(torch.float64) + mem
        budget = ch.budgets(cids, m)
        sigma_r2 = REAL_NOISE_FRACTION * ch.noise_var
        plan = ch.plan_power(h_est, w.norm(dim=1), budget)
        c = plan.c * self.c_gain
        plan = plan._replace(c=c)
        x = form_signals(w, b, plan)  # c (m/m_i) q_i ⊙ v'_i
        power = (x.abs() ** 2).sum(dim=1)
        rho = torch.where(power > budget, torch.sqrt(budget / power.clamp(min=1e-300)), torch.ones_like(power))
        x = x * rho[:, None].to(x.dtype)
        y_dec = ch.receive(x, h, c, round=server_round)
        # Channel memory: what clipping withheld, (1 − ρ_i)(m/m_i) Aᵀ(D_i v'_i); idle nodes keep theirs.
        clip = (b > 0) & (rho < 1) & (plan.m_i > 0)
        scale = (1 - rho) * m / plan.m_i.clamp(min=1).to(torch.float64)
        lost = torch.where(plan.mask, w, 0.0) * scale[:, None]
        kept = op.adjoint(lost[clip]).to(torch.float32) if bool(clip.any()) else None
        for j, cid in enumerate(cids):
            if b[j] > 0:
                self._memory.pop(cid, None)
        for row, j in enumerate(torch.nonzero(clip).flatten().tolist()):
            self._memory[cids[j]] = kept[row].clone()
        clipped = int(clip.sum())
        power = (x.abs() ** 2).sum(dim=1)
        sending = plan.m_i > 0
        chan = {
            "b": b,
            "c": float(c),
            "transmitting": float(b.sum()),
            "mean_m_i": float(plan.m_i[sending].double().mean()) if bool(sending.any()) else 0.0,
            "power": power,
            "budget": budget,
            "expected_power_ratio_max": float((plan.expected_power * self.c_gain**2 / budget).max()),
            "noise_var": ch.noise_var,
            "decoded_noise_var": sigma_r2 / c**2 if c > 0 else 0.0,
            "clipped": clipped,
        }
        if ch.snr_db is not None:
            chan["snr_db"] = float(ch.snr_db)
        return y_dec, chan

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
