"""DaQuSGD client piece: loss-based sample selection, data quantization and GradCorrQ (Hanna et al.).

Source: [Hanna-DaQuSGD] Algorithm 1 (DaQuSGD), Algorithm 2 (DataQ), Algorithm 3
(GradCorrQ), Remark 1, §V (sample selection) and §VI (implementation: batch-max scaling, 3+ bits per
feature, no GradCorrQ); docs/notes.md#daqusgd. The server half is fl_sim.strategies.daqusgd; they share only the
wire keys of fl_sim.wire.keys.

Per round a node:

1. draws a batch of ``batch_size`` of its samples (seeded; the server splits the round's sample budget
   among the round's nodes, see the strategy);
2. computes each sample's loss ℓ(W, Z) under the received model (forward pass only);
3. keeps the samples with ℓ(W, Z) > ℓ_th (threshold sent by the server);
4. quantizes the kept features, with
   * ``per_feature`` (§VI, the paper's experiments): one 32-bit batch scale S = max |Z_ij| and a
     b-bit level per feature (:func:`~fl_sim.compression.dataq.quantize_batch`), or
   * ``exact`` (Algorithm 2 with Remark 1): per sample its norm r = ||Z||_2 (32 bits) and the index of
     (a, b) = DataQ(Z / r, m) in S, ceil(log2 |S|) bits (Theorem 1);
5. with ``gradcorrq`` (Algorithm 1's unbiased version, Algorithm 3): per kept sample the correction
   Δ = g_Z(W) − g_{Z_Q}(W) (per-sample gradients, the node's one backward pass per sample pair), one
   coordinate i* from shared randomness (seed of the round and client, so the server draws the same
   i*) and one bit e_g ~ Bernoulli(Δ_{i*} / (2 C_z B √d/(m−1)) + 1/2) (eq. 9), B the sample's scale
   (S or r); per-sample gradients in eval mode (no batch statistics);
6. sends the quantized features, labels as integers (⌈log2 C⌉ bits each), the GradCorrQ bits, and
   for the server the sum of the sent losses and the number of samples considered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fl_sim.clients.training import per_sample_loss
from fl_sim.compression.dataq import (
    batch_bits,
    dataq_bits,
    dequantize_normalized,
    dequantize_selection,
    gradcorrq_bits,
    per_feature_levels,
    quantize_batch,
    quantize_normalized,
)
from fl_sim.rng import torch_generator
from fl_sim.wire import keys
from fl_sim.compression.packing import wire_bits
from fl_sim.wire.daqusgd import pack_samples

__all__ = ["DaQuSelection", "select_and_quantize", "daqusgd_reply", "per_sample_grad_diff", "gradcorrq_index",
           "THRESHOLD", "BITS_PER_FEATURE", "GRADCORRQ"]

# Former names of the wire keys (now in fl_sim.wire.keys, shared with the strategy)
THRESHOLD = keys.DAQU_THRESHOLD
BITS_PER_FEATURE = keys.DAQU_BITS
METHOD = keys.METHOD
GRADCORRQ = keys.DAQU_GRADCORRQ
LOSS_SUM = keys.DAQU_LOSS_SUM
SENT = keys.DAQU_SENT


@dataclass
class DaQuSelection:
    """What a node sends: quantized features, labels, GradCorrQ bits, and bookkeeping."""

    levels: torch.Tensor  # per_feature: int levels (n_sent, *input_shape); exact: a - b
    scale: float  # per_feature: batch-max scale max_i ‖Z_i‖∞ (32 bits); exact: 0
    labels: torch.Tensor  # int64 (n_sent,)
    loss_sum: float  # Σ ℓ(W, Z) over the sent samples (for the server's threshold rule)
    candidates: int  # samples considered (N of Theorem 3)
    bits: int
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)  # what goes on the wire
    clipped: int = 0  # GradCorrQ samples with |Δ_i*| above eq. (8)'s bound (p clamped)


def gradcorrq_index(round_seed: int, cid: int, n: int, h: int) -> torch.Tensor:
    """i* of each of n sent samples, uniform on [h]: shared randomness of (round seed, client), drawn
    identically by the node and the server (Algorithm 3: then i* costs no bits)."""
    return torch.randint(0, h, (n,), generator=torch_generator(round_seed, "daqusgd-gradcorrq-index", cid))


def per_sample_grad_diff(model: nn.Module, x: torch.Tensor, xq: torch.Tensor, y: torch.Tensor,
                         idx: torch.Tensor, *, chunk_floats: int = 1 << 24) -> torch.Tensor:
    """Δ_i[idx_i] with Δ_i = ∇_W ℓ(W, Z_i) − ∇_W ℓ(W, Z_Q,i) (float64 (n,)), parameters concatenated
    in ``named_parameters`` order. Per-sample gradients by ``torch.func`` (vmap of grad), in chunks of
    samples so that at most ~``chunk_floats`` gradient entries are held at once."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    h = sum(v.numel() for v in params.values())

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    model.eval()
    n = len(y)
    out = torch.zeros(n, dtype=torch.float64)
    step = max(1, chunk_floats // max(1, 2 * h))
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        pair_x = torch.cat([x[sl], xq[sl]])
        pair_y = torch.cat([y[sl], y[sl]])
        g = per_sample(params, pair_x, pair_y)
        flat = torch.cat([g[k].reshape(len(pair_y), -1) for k in params], dim=1).to(torch.float64)
        m = sl.stop - sl.start
        diff = flat[:m] - flat[m:]
        out[sl] = diff.gather(1, idx[sl].unsqueeze(1)).squeeze(1)
    return out


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
    quantizer: str = "per_feature",
    levels: int = 32,
    gradcorrq: bool = False,
    c_z: float = 1.0,
    round_seed: int = 0,
    cid: int = 0,
) -> DaQuSelection:
    """Steps 1-5 above; ``bits`` counts scales / norms, every level or index, every label and GradCorrQ bit."""
    if quantizer not in ("per_feature", "exact"):
        raise ValueError(f"quantizer={quantizer!r}: use 'per_feature' (§VI) or 'exact' (Algorithm 2)")
    n = len(y)
    idx = torch.randperm(n, generator=generator)[: max(0, min(batch_size, n))]
    xb, yb = x[idx], y[idx]
    losses = per_sample_loss(model, xb, yb) if len(idx) else torch.zeros(0)
    keep = losses > threshold
    xs, ys = xb[keep], yb[keep]
    n_sent = int(keep.sum())
    features = int(math.prod(x.shape[1:]))
    label_bits = math.ceil(math.log2(num_classes)) if num_classes > 1 else 0
    flat = xs.reshape(n_sent, features)
    if n_sent == 0:
        flat = flat.to(torch.float32)
    if quantizer == "per_feature":
        lv, scale_t = quantize_batch(flat, bits_per_feature)
        scale = float(scale_t)
        arrays = {"levels": lv.reshape(xs.shape), "scale": scale_t.reshape(1)}
        xq = dequantize_selection(lv.reshape(xs.shape), scale, bits_per_feature)
        steps = per_feature_levels(bits_per_feature) - 1
        sample_scale = torch.full((n_sent,), scale, dtype=torch.float64)
        bits = batch_bits(n_sent, features, bits_per_feature)
        level_view = lv.reshape(xs.shape)
    else:
        a, b, r = quantize_normalized(flat.to(torch.float32), levels)
        arrays = {"a": a.to(torch.int16).reshape(xs.shape), "b": b.to(torch.int16).reshape(xs.shape), "norms": r}
        xq = dequantize_normalized(a, b, r, levels).reshape(xs.shape)
        steps = levels - 1
        sample_scale = r.to(torch.float64)
        scale = 0.0
        bits = n_sent * (32 + dataq_bits(features, levels))
        level_view = (a - b).reshape(xs.shape)
    bits += n_sent * label_bits
    clipped = 0
    if gradcorrq and n_sent:
        h = sum(p.numel() for p in model.parameters())
        i_star = gradcorrq_index(round_seed, cid, n_sent, h)
        picked = per_sample_grad_diff(model, xs.to(torch.float32), xq, ys, i_star)
        bound = c_z * sample_scale * math.sqrt(features) / steps  # eq. (8), per sample
        bit, clipped = gradcorrq_bits(picked, bound,
                                      generator=torch_generator(round_seed, "daqusgd-gradcorrq-bit", cid))
        arrays["gc_bits"] = bit
        bits += n_sent  # one bit per sample; i* is shared randomness
    return DaQuSelection(
        levels=level_view,
        scale=scale,
        labels=ys,
        loss_sum=float(losses[keep].sum()),
        candidates=len(idx),
        bits=int(bits),
        arrays=arrays,
        clipped=clipped,
    )


def daqusgd_reply(rt, message: Message, context: Context, cid: int) -> Message:
    """The DaQuSGD train handler of the fl-sim ClientApp (runtime ``rt`` gives data and model)."""
    config = message.content[keys.CONFIG]
    rnd = int(config.get(keys.ROUND, 0))
    x, y = rt.data.client_data(cid)
    model = rt.load_model(message.content[keys.ARRAYS])
    bits_per_feature = int(config[keys.DAQU_BITS])
    quantizer = str(config.get(keys.DAQU_QUANTIZER, "per_feature"))
    levels = int(config.get(keys.DAQU_LEVELS, 32))
    sel = select_and_quantize(
        model,
        x,
        y,
        threshold=float(config[keys.DAQU_THRESHOLD]),
        bits_per_feature=bits_per_feature,
        num_classes=rt.data.num_classes,
        batch_size=int(config.get(keys.BATCH_SIZE, rt.cfg.train.batch_size)),
        generator=torch_generator(rt.cfg.seed, rnd, "daqusgd-batch", cid),
        quantizer=quantizer,
        levels=levels,
        gradcorrq=bool(config.get(keys.DAQU_GRADCORRQ, False)),
        c_z=float(config.get(keys.DAQU_CZ, 1.0)),
        round_seed=int(config.get(keys.SEED, 0)),
        cid=cid,
    )
    wire = pack_samples(sel.arrays, sel.labels, quantizer=quantizer, bits_per_feature=bits_per_feature, levels=levels,
                        num_classes=rt.data.num_classes)  # packed at the bits counted (fl_sim.wire.daqusgd)
    record = {name: Array(a) for name, a in wire.items()}
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: int(len(sel.labels)),
            keys.M_CID: cid,
            keys.UPLINK_BITS: wire_bits(wire.values()),
            keys.DAQU_LOSS_SUM: sel.loss_sum,
            keys.DAQU_SENT: int(len(sel.labels)),
            keys.DAQU_CONSIDERED: sel.candidates,
            keys.DAQU_CLIPPED: sel.clipped,
        }
    )
    return Message(content=RecordDict({keys.ARRAYS: ArrayRecord(record), keys.METRICS: metrics}), reply_to=message)
