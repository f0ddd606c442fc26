"""DaQuSGD: nodes send quantized data samples whose loss exceeds a threshold (Hanna et al.).

Source: [Hanna-DaQuSGD] Algorithm 1, Algorithms 2-3, §V (sample selection, Theorem 3) and §VI
(experiments); docs/notes.md#daqusgd. The client half is fl_sim.clients.daqusgd; the two meet
only through the wire keys of fl_sim.wire.keys (this module does not import the client).

Round t (the learning agent is the server):

1. send W, the threshold ℓ_th and each node's share of the round's sample budget (``budget``);
2. each node considers its share of samples and sends the DataQ-quantized samples Z_Q with
   ℓ(W, Z) > ℓ_th, their labels, and (``gradcorrq``) one GradCorrQ bit per sample;
3. the server forms the stochastic gradient of Theorem 3 (``loss_average="considered"``, default):

       ĝ = (1/N) Σ_{sent i} [∇ℓ(W, Z_Q,i) + Δ̂_i],   N = samples considered this round (sent or not),

   i.e. an unsent sample contributes zero (App. G: g̃ = ĝ·𝕀(ℓ > ℓ_th)); Δ̂_i = 0 without GradCorrQ,
   else eq. (10): (2 e_g − 1) C_z B_i h √d/(m−1) at the shared coordinate i*_i. The option
   ``loss_average="sent"`` divides by the number sent instead (fl-sim's earlier rule: the step then
   grows by considered/sent as the threshold rises);
4. SGD with momentum: m ← μ m + ĝ, W ← W − η m (the paper's optimizer: SGD, momentum 0.9); with
   GradCorrQ the step is η ρ (``gradcorrq_step``, below);
5. threshold rule (§VI): at the start of each epoch, ℓ_th = factor × (average loss of the samples
   sent during the previous epoch), factor = 0.2; the first epoch sends everything (ℓ_th = 0).
   An epoch is ``epoch_rounds`` rounds (default: one expected pass over the clients).

Sample budget (``budget``): the paper's agent draws a batch of 128 samples per iteration (§VI). With
``budget="round"`` (default) ``batch_size`` is that per-round total, split evenly among the round's
nodes (the first ``batch_size mod K`` nodes in client-id order consider one more); ``budget="client"``
(fl-sim's earlier rule) lets every node consider ``batch_size`` samples, so a round considers K times more.

Quantizer (``quantizer``): "per_feature" (§VI, the paper's experiments: batch scale + ``bits_per_feature``
bits per feature) or "exact" (Algorithm 2 per sample with Remark 1: the sample's norm + the index of
(a, b) in S, ⌈log2 |S|⌉ bits, m = ``levels``). Algorithm 1's unbiased version is
``quantizer="exact", gradcorrq=True``; §VI runs without GradCorrQ, so it is off by default.

GradCorrQ's step (``gradcorrq_step="theorem2"``, the default with ``gradcorrq``). Eq. (10) is unbiased,
E[Δ̂] = Δ, but each sample's Δ̂ is a one-hot of size h b (b = C_z B √d/(m−1), eq. 8), so its second
moment is E‖Δ̂‖² = h² b² against ‖Δ‖² ≤ b²: [Hanna-DaQuSGD] Lemma 1 bounds the estimator's deviation by
σ̂_GC = C_z B (2 + (h+1)√d/(m−1)), where the DataQ gradient alone deviates by at most
σ̂_Q = C_z B (2 + √d/(m−1)) (‖g_{Z_Q} − ∇L‖ ≤ ‖g_{Z_Q} − g_Z‖ + ‖g_Z − ∇L‖ ≤ C_z B √d/(m−1) + 2 C_z B).
Theorem 2 takes the step γ = (1/σ̂) √(2 D₀/(n C_w)), inversely proportional to the deviation bound.
Reading the user's η as the step for σ̂_Q (the setting the paper's experiments tuned), the same D₀, C_w,
n give for Algorithm 1 the step

    η_GC = η ρ,   ρ = σ̂_Q / σ̂_GC = (2 + √d/(m−1)) / (2 + (h+1)√d/(m−1))   (≈ 1/h for large h).

A step scale leaves ĝ unbiased (E[η ρ ĝ] = η ρ ∇L); it shrinks the correction's noise per step to
about η b per sample, the size of the DataQ step. ``gradcorrq_step="none"`` keeps η: with h = 14,210
(configs/daqusgd.yaml's MLP, d = 60, 3 bits: ρ = 1.25e-4) one sample's correction moves a weight by
η h b / N ≈ 17 and the run diverges (test loss 2.34 → 708 → 3128 → 7486 in 3 rounds). The price of one
bit per sample is the step: at ρ ≈ 1/h the model moves h times slower, which is why the paper's
experiments leave GradCorrQ off (§VI: it helped only below 3 bits per feature). Derivation:
docs/notes.md#gradcorrq-step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fl_sim.wire import keys
from fl_sim.compression.dataq import (
    dequantize_normalized,
    dequantize_selection,
    gradcorrq_values,
    per_feature_levels,
)
from fl_sim.compression.errors import PayloadError
from fl_sim.compression.packing import wire_bits
from fl_sim.wire.daqusgd import unpack_samples
from fl_sim.wire.records import read_array
from fl_sim.rng import torch_generator
from fl_sim.strategies import guards
from fl_sim.strategies.base import ClientReply, ReplyError, UpdateStrategy

__all__ = ["DaQuSGD", "gradcorrq_step_scale", "GRADCORRQ_STEPS"]

LOSS_AVERAGES = ("considered", "sent")
BUDGETS = ("round", "client")
QUANTIZERS = ("per_feature", "exact")
GRADCORRQ_STEPS = ("theorem2", "none")


def gradcorrq_step_scale(h: int, d: int, steps: int) -> float:
    """ρ = σ̂_Q / σ̂_GC = (2 + √d/(m−1)) / (2 + (h+1)√d/(m−1)): Theorem 2's step for Algorithm 1 relative to
    the DataQ gradient's (module docstring); h model parameters, d features, m−1 = ``steps``."""
    r = math.sqrt(d) / steps
    return (2.0 + r) / (2.0 + (h + 1) * r)


class DaQuSGD(UpdateStrategy):
    """Hanna et al.'s DaQuSGD with loss-threshold sample selection.

    Args:
        model: a torch module with the global model's architecture (the server computes gradients).
        lr: η of the server's SGD step. momentum: μ.
        bits_per_feature: per-feature DataQ bits (paper: 3).
        threshold_factor: ℓ_th = factor × previous epoch's mean sent loss (paper: 0.2).
        epoch_rounds: rounds per epoch (None: clients / clients_per_round).
        batch_size: samples considered per round (``budget="round"``, paper: 128) or per node ("client").
        budget: "round" (paper) or "client" (see the module doc).
        loss_average: "considered" (Theorem 3, paper) or "sent" (see the module doc).
        quantizer: "per_feature" (§VI) or "exact" (Algorithm 2 + Remark 1). levels: m of "exact".
        gradcorrq: send Algorithm 3's bit per sample and add its correction (Algorithm 1).
        c_z: C_z of eq. (4) in GradCorrQ's bound (App. A: empirically ≤ 1).
        gradcorrq_step: "theorem2" (default: the step η ρ of the module doc, stable and unbiased) or
            "none" (η as given; diverges for any model of more than a few hundred parameters).
    """

    # threshold rule (running epoch sums) and the server's SGD momentum
    STATE_ATTRS = UpdateStrategy.STATE_ATTRS + ("threshold", "_epoch_loss_sum", "_epoch_sent", "grad_momentum")

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        model: nn.Module,
        lr: float = 0.05,
        momentum: float = 0.9,
        bits_per_feature: int = 3,
        threshold_factor: float = 0.2,
        epoch_rounds: int | None = None,
        batch_size: int = 128,
        budget: str = "round",
        loss_average: str = "considered",
        quantizer: str = "per_feature",
        levels: int = 32,
        gradcorrq: bool = False,
        c_z: float = 1.0,
        gradcorrq_step: str = "theorem2",
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(inner, **kwargs)
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"lr={lr}, momentum={momentum}: need lr > 0 and momentum in [0, 1)")
        if not 2 <= bits_per_feature <= 15:
            raise ValueError(f"bits_per_feature={bits_per_feature}: use 2..15 (levels travel as int16)")
        if threshold_factor < 0:
            raise ValueError(f"threshold_factor={threshold_factor} must be >= 0")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        for name, value, allowed in (("budget", budget, BUDGETS), ("loss_average", loss_average, LOSS_AVERAGES),
                                     ("quantizer", quantizer, QUANTIZERS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}")
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 2**15:
            raise ValueError(f"levels={levels!r}: m of the exact DataQ must be an int in 2..32768 (int16 on the wire)")
        if not c_z > 0:
            raise ValueError(f"c_z={c_z}: the Lipschitz constant C_z must be > 0")
        if gradcorrq_step not in GRADCORRQ_STEPS:
            raise ValueError(f"gradcorrq_step={gradcorrq_step!r}: use 'theorem2' (the step scaled by Theorem 2's "
                             "deviation bounds) or 'none' (the step as given)")
        self.gradcorrq_step = gradcorrq_step
        self.model = model
        self.lr, self.mu = float(lr), float(momentum)
        self.bits = int(bits_per_feature)
        self.factor = float(threshold_factor)
        self.batch_size = int(batch_size)
        self.budget, self.loss_average, self.quantizer = budget, loss_average, quantizer
        self.levels, self.gradcorrq, self.c_z = int(levels), bool(gradcorrq), float(c_z)
        self.num_classes = num_classes
        self.input_shape = None if input_shape is None else tuple(int(v) for v in input_shape)
        if epoch_rounds is None:
            n = len(self.client_ids) if self.client_ids is not None else 1
            epoch_rounds = max(1, math.ceil(n / max(1, self.clients_per_round or 1)))
        self.epoch_rounds = int(epoch_rounds)
        self.threshold = 0.0
        self._epoch_loss_sum = 0.0
        self._epoch_sent = 0
        self.grad_momentum: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    @classmethod
    def from_experiment(cls, exp) -> dict[str, Any]:
        return {"model": exp.model, "batch_size": exp.cfg.train.batch_size, "lr": exp.cfg.train.lr,
                "num_classes": exp.data.num_classes, "input_shape": tuple(exp.data.input_shape)}

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        if server_round > 1 and (server_round - 1) % self.epoch_rounds == 0:
            if self._epoch_sent:
                self.threshold = self.factor * self._epoch_loss_sum / self._epoch_sent
            self._epoch_loss_sum, self._epoch_sent = 0.0, 0
        config[keys.METHOD] = "daqusgd"
        config[keys.DAQU_THRESHOLD] = float(self.threshold)
        config[keys.DAQU_BITS] = self.bits
        config[keys.DAQU_QUANTIZER] = self.quantizer
        config[keys.DAQU_LEVELS] = self.levels
        config[keys.DAQU_GRADCORRQ] = self.gradcorrq
        config[keys.DAQU_CZ] = self.c_z
        config[keys.BATCH_SIZE] = self.batch_size

    def shares(self, k: int) -> list[int]:
        """Samples each of the round's k nodes considers (client-id order): the round budget split evenly."""
        if self.budget == "client":
            return [self.batch_size] * k
        base, extra = divmod(self.batch_size, k)
        return [base + (1 if i < extra else 0) for i in range(k)]

    def configure_train(
        self, server_round: int, arrays, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg, share in zip(messages, self.shares(len(messages))):  # messages are in client-id order
            msg.content[self.configrecord_key][keys.BATCH_SIZE] = int(share)
        return messages

    # ------------------------------------------------------------------ replies
    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        """One reply's samples (features, labels, GradCorrQ bits), unpacked (fl_sim.wire.daqusgd) and every
        value checked; bits counted by the server from the bytes that arrived (the client's ``uplink-bits`` is
        only compared)."""
        arrays, (_, metrics) = self.reply_arrays(msg), self.reply_metrics(msg)
        try:
            received = {k: read_array(arr, k) for k, arr in arrays.items()}
            t = unpack_samples(received, quantizer=self.quantizer, bits_per_feature=self.bits, levels=self.levels,
                               gradcorrq=self.gradcorrq)
        except (PayloadError, TypeError, ValueError) as exc:
            raise ReplyError(f"DaQuSGD reply: {exc}") from None
        if self.num_classes and int(t["classes"]) != self.num_classes:
            raise ReplyError(f"labels coded for {int(t['classes'])} classes; the task has {self.num_classes}")
        if self.quantizer == "per_feature":
            levels, scale_t = t["levels"].to(torch.int64), t["scale"].reshape(-1)
            n = levels.shape[0]
            steps = per_feature_levels(self.bits) - 1
            if scale_t.numel() != 1 or not math.isfinite(float(scale_t[0])) or float(scale_t[0]) < 0:
                raise ReplyError(f"invalid scale {scale_t.tolist()}")
            if levels.numel() and int(levels.abs().max()) > steps:
                raise ReplyError(f"levels outside -{steps}..{steps} for {self.bits} bits per feature")
            scale = float(scale_t[0])
            x = dequantize_selection(levels, scale, self.bits) if n else None
            sample_scale = torch.full((n,), scale, dtype=torch.float64)
        else:
            a, b, r = t["a"].to(torch.int64), t["b"].to(torch.int64), t["norms"].to(torch.float32).reshape(-1)
            n = a.shape[0]
            steps = self.levels - 1
            if a.shape != b.shape or r.numel() != n:
                raise ReplyError(f"a {tuple(a.shape)}, b {tuple(b.shape)} and {r.numel()} norms disagree")
            if not guards.all_finite(r) or bool((r < 0).any()):
                raise ReplyError("norms must be finite and >= 0")
            if n and (int(a.min()) < 0 or int(b.min()) < 0 or int(a.max()) > steps or int(b.max()) > steps
                      or int((a + b).reshape(n, -1).sum(1).max()) > steps**2):
                raise ReplyError(f"(a, b) outside S for m = {self.levels} (Theorem 1 (i))")
            x = dequantize_normalized(a.reshape(n, -1), b.reshape(n, -1), r, self.levels).reshape(a.shape) if n else None
            sample_scale = r.to(torch.float64)
        labels = t["labels"].to(torch.int64).reshape(-1)
        if labels.numel() != n:
            raise ReplyError(f"{n} feature rows but {labels.numel()} labels")
        shape = tuple((t["levels"] if self.quantizer == "per_feature" else t["a"]).shape[1:])
        if self.input_shape is not None and shape != self.input_shape:
            raise ReplyError(f"samples of shape {shape}, the model takes {self.input_shape}")
        if n and (labels.min() < 0 or (self.num_classes and labels.max() >= self.num_classes)):
            raise ReplyError(f"labels outside 0..{(self.num_classes or 0) - 1}")
        features = int(x[0].numel()) if n else 0
        correction = None
        if self.gradcorrq and n:
            bits = t["gc_bits"].reshape(-1)
            if bits.numel() != n or bool(((bits != 0) & (bits != 1)).any()):
                raise ReplyError("gc_bits must hold one bit (0 or 1) per sent sample")
            bound = self.c_z * sample_scale * math.sqrt(features) / steps  # eq. (8), as the node computed it
            correction = (bits, bound)
        considered = int(guards.finite_number(metrics.get(keys.DAQU_CONSIDERED, n), f"metric {keys.DAQU_CONSIDERED!r}",
                                              lo=n, integer=True))
        loss_sum = guards.finite_number(metrics.get(keys.DAQU_LOSS_SUM, 0.0), f"metric {keys.DAQU_LOSS_SUM!r}", lo=0.0)
        clipped = int(guards.finite_number(metrics.get(keys.DAQU_CLIPPED, 0), f"metric {keys.DAQU_CLIPPED!r}",
                                           lo=0, hi=n, integer=True))
        self._declared_bits.check(cid, msg.metadata.src_node_id, metrics.get(keys.DAQU_SENT), n,
                                  f"metric {keys.DAQU_SENT!r} (samples)")
        # bits counted by the server: 8 x the bytes that arrived, packed as fl_sim.wire.daqusgd says (the DataQ
        # batch at b bits per feature or the per-feature (a, b) code, ceil(log2 C) per label, GradCorrQ's bit per
        # sample, the float scales and the small header); the node's uplink-bits is only compared
        bits = wire_bits(received.values())
        return {"x": x, "y": labels, "cid": cid, "considered": considered, "correction": correction,
                "clipped": clipped, "loss_sum": loss_sum}, int(bits)

    # reply guards (fl_sim.strategies.guards): the features' magnitude bounds a reply (clipping scales the
    # features and GradCorrQ's bound with them); the mean sent loss feeds the next epoch's threshold.
    def reply_norm(self, reply: ClientReply) -> float | None:
        x = reply.data["x"]
        return float(x.detach().abs().max()) if x is not None and x.numel() else None

    def scale_reply(self, reply: ClientReply, factor: float) -> None:
        d = dict(reply.data)
        d["x"] = d["x"] * factor
        if d["correction"] is not None:
            d["correction"] = (d["correction"][0], d["correction"][1] * factor)
        reply.data = d

    def reply_scalars(self, reply: ClientReply) -> dict[str, float]:
        n = reply.data["y"].numel()
        return {f"mean sent loss ({keys.DAQU_LOSS_SUM!r} / samples)": reply.data["loss_sum"] / n} if n else {}

    def decodes_each_client(self) -> bool:
        return False  # nodes send data samples; the server computes one gradient from them

    # ------------------------------------------------------------------ server gradient
    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        for r in replies:  # the threshold rule reads only replies that passed every check and guard
            self._epoch_loss_sum += r.data["loss_sum"]
            self._epoch_sent += int(r.data["y"].numel())
        got = [r.data for r in replies if r.data["x"] is not None]
        considered = sum(r.data["considered"] for r in replies)
        self._last = {"received_samples": 0, "threshold": self.threshold, "considered_samples": considered}
        if not got:
            return torch.zeros_like(self.global_vector)
        x = torch.cat([g["x"] for g in got])
        y = torch.cat([g["y"] for g in got])
        denom = considered if self.loss_average == "considered" else len(y)
        self._load(self.global_vector)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss_sum = nn.functional.cross_entropy(self.model(x), y, reduction="sum")
        (loss_sum / denom).backward()
        g = self._param_grad()
        if self.gradcorrq:
            g += self._correction(got, g.numel()) / denom
            self._last["gradcorrq_clipped"] = sum(d["clipped"] for d in got)
            if self.gradcorrq_step == "theorem2":
                steps = per_feature_levels(self.bits) - 1 if self.quantizer == "per_feature" else self.levels - 1
                rho = gradcorrq_step_scale(g.numel(), int(x[0].numel()), steps)
                g *= rho
                self._last["gradcorrq_step_scale"] = rho
        g = self._to_flat(g)
        if self.grad_momentum is None:
            self.grad_momentum = torch.zeros_like(g)
        self.grad_momentum.mul_(self.mu).add_(g)
        self._last.update(received_samples=int(len(y)), server_batch_loss=float(loss_sum.detach()) / len(y))
        return -self.lr * self.grad_momentum

    def _correction(self, got: list[dict], h: int) -> torch.Tensor:
        """Σ_i Δ̂_i (eq. 10) over every sent sample: the value at the shared i*_i of its node."""
        total = torch.zeros(h, dtype=torch.float64)
        for d in got:
            bits, bound = d["correction"]
            i_star = torch.randint(0, h, (len(bits),),
                                   generator=torch_generator(self._round_seed, "daqusgd-gradcorrq-index", d["cid"]))
            total.index_add_(0, i_star, gradcorrq_values(bits, bound, h))
        return total.to(torch.float32)

    def _param_grad(self) -> torch.Tensor:
        """∇ in ``named_parameters`` order (the order of the nodes' GradCorrQ coordinates)."""
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.model.parameters()
        ])

    def _to_flat(self, g: torch.Tensor) -> torch.Tensor:
        """Parameter-order vector laid out like the flat model vector (every float state entry; buffers 0)."""
        offsets, o = {}, 0
        for name, p in self.model.named_parameters():
            offsets[name] = (o, p.numel())
            o += p.numel()
        parts = []
        for name, t in self.model.state_dict().items():
            if not torch.is_floating_point(t):
                continue
            if name in offsets:
                s, n = offsets[name]
                parts.append(g[s : s + n])
            else:
                parts.append(torch.zeros(t.numel()))
        return torch.cat(parts)

    def _load(self, vector: torch.Tensor) -> None:
        offset = 0
        state = self.model.state_dict()
        with torch.no_grad():
            for name, t in state.items():
                if torch.is_floating_point(t):
                    t.copy_(vector[offset : offset + t.numel()].reshape(t.shape))
                    offset += t.numel()

    def server_update(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta  # the server's own SGD step (η, μ) is in combine

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
