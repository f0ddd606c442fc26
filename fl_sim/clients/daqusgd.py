"""DaQuSGD client piece: loss-based sample selection and data quantization (Hanna et al.).

Source: shared/papers/004_8a6bcfc5f528e1f3.txt Algorithm 1 (DaQuSGD), Algorithm 2 (DataQ), §V
(sample selection) and §VI (implementation: batch-max scaling, 3+ bits per feature, no GradCorrQ);
NOTES.md §5.

A node never back-propagates. Per round it:

1. draws a batch of at most ``batch_size`` of its samples (seeded);
2. computes each sample's loss ℓ(W, Z) under the received model (forward pass only);
3. keeps the samples with ℓ(W, Z) > ℓ_th (threshold sent by the server);
4. quantizes the kept features with DataQ after batch-max scaling (one 32-bit scale per batch);
5. sends the quantized features, the labels as integers (⌈log2 C⌉ bits each) and, for the
   server's threshold rule, the sum of the sent samples' losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from .. import keys
from ..compression.dataq import batch_bits, dequantize_batch, quantize_batch
from ..rng import torch_generator
from .training import per_sample_loss

__all__ = ["DaQuSelection", "select_and_quantize", "daqusgd_reply", "THRESHOLD", "BITS_PER_FEATURE", "GRADCORRQ"]

# Wire keys live in fl_sim.keys (the server side reads the same constants); these names are aliases.
THRESHOLD = keys.DAQUSGD_THRESHOLD
BITS_PER_FEATURE = keys.DAQUSGD_BITS
METHOD = keys.METHOD
GRADCORRQ = keys.DAQUSGD_GRADCORRQ
LOSS_SUM = keys.DAQUSGD_LOSS_SUM
SENT = keys.DAQUSGD_SENT


@dataclass
class DaQuSelection:
    """What a node sends: quantized features (levels + scale), labels, and bookkeeping."""

    levels: torch.Tensor  # integer levels of the kept samples' features, shape (n_sent, *input_shape)
    scale: float  # batch-max scale max_i ‖Z_i‖∞ (32 bits)
    labels: torch.Tensor  # int64 (n_sent,)
    loss_sum: float  # Σ ℓ(W, Z) over the sent samples (for the server's threshold rule)
    candidates: int
    bits: int


def select_and_quantize(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    threshold: float,
    bits_per_feature: int,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
) -> DaQuSelection:
    """Steps 1-4 above; ``bits`` counts the scale, every level and every label."""
    n = len(y)
    idx = torch.randperm(n, generator=generator)[: min(batch_size, n)]
    xb, yb = x[idx], y[idx]
    losses = per_sample_loss(model, xb, yb)
    keep = losses > threshold
    xs, ys = xb[keep], yb[keep]
    n_sent = int(keep.sum())
    features = int(math.prod(x.shape[1:]))
    levels, scale = quantize_batch(xs.reshape(n_sent, features), bits_per_feature)
    label_bits = math.ceil(math.log2(num_classes)) if num_classes > 1 else 0
    bits = batch_bits(n_sent, features, bits_per_feature) + n_sent * label_bits
    return DaQuSelection(
        levels=levels.reshape(xs.shape),
        scale=float(scale),
        labels=ys,
        loss_sum=float(losses[keep].sum()),
        candidates=len(idx),
        bits=int(bits),
    )


def dequantize_selection(levels: torch.Tensor, scale: float, bits_per_feature: int) -> torch.Tensor:
    """Server side: features back from levels and the batch scale."""
    flat = levels.reshape(levels.shape[0], -1)
    return dequantize_batch(flat, scale, bits_per_feature).reshape(levels.shape).to(torch.float32)


def daqusgd_reply(rt, message: Message, context: Context, cid: int) -> Message:
    """The DaQuSGD train handler of the fl-sim ClientApp (runtime ``rt`` gives data and model)."""
    config = message.content[keys.CONFIG]
    rnd = int(config.get(keys.ROUND, 0))
    x, y = rt.data.client_data(cid)
    model = rt.load_model(message.content[keys.ARRAYS])
    sel = select_and_quantize(
        model,
        x,
        y,
        threshold=float(config[THRESHOLD]),
        bits_per_feature=int(config[BITS_PER_FEATURE]),
        num_classes=rt.data.num_classes,
        batch_size=int(config.get(keys.BATCH_SIZE, rt.cfg.train.batch_size)),
        generator=torch_generator(rt.cfg.seed, rnd, "daqusgd-batch", cid),
    )
    arrays = ArrayRecord(
        {
            "levels": Array(sel.levels.numpy().astype(np.int16)),
            "labels": Array(sel.labels.numpy().astype(np.int64)),
            "scale": Array(np.array([sel.scale], np.float32)),
        }
    )
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: int(len(sel.labels)),
            keys.M_CID: cid,
            keys.UPLINK_BITS: sel.bits,
            LOSS_SUM: sel.loss_sum,
            SENT: int(len(sel.labels)),
            "candidates": sel.candidates,
        }
    )
    return Message(content=RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=message)
