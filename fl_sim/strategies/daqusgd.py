"""DaQuSGD: nodes send quantized data samples whose loss exceeds a threshold (Hanna et al.).

Source: shared/papers/004_8a6bcfc5f528e1f3.txt Algorithm 1, §V (sample selection, Theorem 3) and
§VI (experiments); NOTES.md §5. The client half is fl_sim.clients.daqusgd.

Round t (the learning agent is the server):

1. send W and the threshold ℓ_th to the sampled nodes;
2. each node sends the DataQ-quantized samples Z_Q with ℓ(W, Z) > ℓ_th, and their labels;
3. the server computes ĝ = mean over received samples of ∇ℓ(W, Z_Q) (eq. 2 with g_{Z_Q}),
   and steps with SGD + momentum: m ← μ m + ĝ, W ← W − η m (the paper's optimizer: SGD,
   momentum 0.9);
4. threshold rule (§VI): at the start of each epoch, ℓ_th = factor × (average loss of the samples
   sent during the previous epoch), factor = 0.2; the first epoch sends everything (ℓ_th = 0).
   An epoch is ``epoch_rounds`` rounds (default: one expected pass over the clients).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy
from torch import nn

from .. import keys
from ..compression.dataq import batch_bits, dequantize_batch, per_feature_levels
from ..records import read_array
from . import guards
from .base import ClientReply, ReplyError, UpdateStrategy

__all__ = ["DaQuSGD"]


class DaQuSGD(UpdateStrategy):
    """Hanna et al.'s DaQuSGD with loss-threshold sample selection.

    Args:
        model: a torch module with the global model's architecture (the server computes gradients).
        lr: η of the server's SGD step. momentum: μ.
        bits_per_feature: DataQ bits per feature (paper: 3).
        threshold_factor: ℓ_th = factor × previous epoch's mean sent loss (paper: 0.2).
        epoch_rounds: rounds per epoch (None: clients / clients_per_round).
        batch_size: samples a node considers per round.
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
        batch_size: int = 32,
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
        self.model = model
        self.lr, self.mu = float(lr), float(momentum)
        self.bits = int(bits_per_feature)
        self.factor = float(threshold_factor)
        self.batch_size = int(batch_size)
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
        config[keys.DAQUSGD_THRESHOLD] = float(self.threshold)
        config[keys.DAQUSGD_BITS] = self.bits
        config[keys.BATCH_SIZE] = self.batch_size

    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        """(features, labels, sent-loss sum) of one reply, every value checked; bits counted by the server.

        Bits: the DataQ batch (:func:`~fl_sim.compression.dataq.batch_bits`, 32 + N d b) plus
        ⌈log2 C⌉ per label, from what arrived (the client's ``uplink-bits`` is only compared).
        """
        arrays, (_, metrics) = self.reply_arrays(msg), self.reply_metrics(msg)
        if set(arrays.keys()) != {"levels", "labels", "scale"}:
            raise ReplyError(f"DaQuSGD reply must carry exactly levels, labels, scale; got {sorted(arrays.keys())}")
        try:
            levels_nd, labels_nd, scale_nd = (read_array(arrays[k], k) for k in ("levels", "labels", "scale"))
        except (KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ReplyError(f"DaQuSGD reply lacks levels/labels/scale ({exc})") from None
        if levels_nd.dtype.kind not in "iu" or labels_nd.dtype.kind not in "iu" or scale_nd.shape != (1,) \
                or scale_nd.dtype != np.float32:
            raise ReplyError(f"levels {levels_nd.dtype}, labels {labels_nd.dtype} must be integers and scale one float "
                             f"(got shape {scale_nd.shape}, {scale_nd.dtype})")
        levels = torch.from_numpy(levels_nd.astype("int64"))
        labels = torch.from_numpy(labels_nd.astype("int64").reshape(-1))
        scale = float(scale_nd[0])
        if levels.dim() < 2 or levels.shape[0] != labels.shape[0]:
            raise ReplyError(f"levels of shape {tuple(levels.shape)} for {labels.shape[0]} labels")
        if self.input_shape is not None and tuple(levels.shape[1:]) != self.input_shape:
            raise ReplyError(f"samples of shape {tuple(levels.shape[1:])}, the model takes {self.input_shape}")
        top = per_feature_levels(self.bits) - 1
        if levels.numel() and int(levels.abs().max()) > top:
            raise ReplyError(f"feature levels outside -{top}..{top} ({self.bits} bits per feature)")
        if not math.isfinite(scale) or scale < 0:
            raise ReplyError(f"invalid scale {scale}")
        if labels.numel() and (labels.min() < 0 or (self.num_classes and labels.max() >= self.num_classes)):
            raise ReplyError(f"labels outside 0..{(self.num_classes or 0) - 1}")
        loss_sum = guards.finite_number(metrics.get(keys.DAQUSGD_LOSS_SUM, 0.0), f"metric {keys.DAQUSGD_LOSS_SUM!r}",
                                        lo=0.0)
        n = int(labels.numel())
        self._declared_bits.check(cid, msg.metadata.src_node_id, metrics.get(keys.DAQUSGD_SENT), n,
                                  f"metric {keys.DAQUSGD_SENT!r} (samples)")
        x = None
        if n:  # features back from the DataQ levels and the batch scale (Alg. 2)
            flat = dequantize_batch(levels.reshape(levels.shape[0], -1), scale, self.bits)
            x = flat.reshape(levels.shape).to(torch.float32)
        label_bits = math.ceil(math.log2(self.num_classes)) if self.num_classes and self.num_classes > 1 else 0
        bits = batch_bits(n, int(math.prod(levels.shape[1:])), self.bits) + n * label_bits
        return (x, labels, loss_sum), bits

    # reply guards (fl_sim.strategies.guards): the samples' scale bounds the features (clipping scales
    # them), and the mean sent loss feeds the next epoch's threshold.
    def reply_norm(self, reply: ClientReply) -> float | None:
        x = reply.data[0]
        return None if x is None else float(x.detach().abs().max()) if x.numel() else None

    def scale_reply(self, reply: ClientReply, factor: float) -> None:
        x, labels, loss_sum = reply.data
        reply.data = (x * factor, labels, loss_sum)

    def reply_scalars(self, reply: ClientReply) -> dict[str, float]:
        n = reply.data[1].numel()
        return {f"mean sent loss ({keys.DAQUSGD_LOSS_SUM!r} / samples)": reply.data[2] / n} if n else {}

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        for r in replies:  # the threshold rule reads only replies that passed every check and guard
            self._epoch_loss_sum += r.data[2]
            self._epoch_sent += int(r.data[1].numel())
        got = [r.data for r in replies if r.data[0] is not None]
        self._last = {"received_samples": 0, "threshold": self.threshold}
        if not got:
            return torch.zeros_like(self.global_vector)
        x = torch.cat([g[0] for g in got])
        y = torch.cat([g[1] for g in got])
        self._load(self.global_vector)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        g = self._flat_grad()
        if self.grad_momentum is None:
            self.grad_momentum = torch.zeros_like(g)
        self.grad_momentum.mul_(self.mu).add_(g)
        self._last.update(received_samples=int(len(y)), server_batch_loss=float(loss.detach()))
        return -self.lr * self.grad_momentum

    def _flat_grad(self) -> torch.Tensor:
        """Gradient laid out like the flat vector (every float state entry; buffers get zeros)."""
        named = dict(self.model.named_parameters())
        parts = []
        for name, t in self.model.state_dict().items():
            if not torch.is_floating_point(t):
                continue
            p = named.get(name)
            parts.append(p.grad.reshape(-1) if p is not None and p.grad is not None else torch.zeros(t.numel()))
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

