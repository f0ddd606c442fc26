"""``compression_mod``: a ClientApp mod that turns a train reply's model into an encoded update.

Works around any ClientApp that returns a model (``ClientApp(mods=[compression_mod])``):

1. pass non-train messages, and train messages whose config names no codec, through untouched;
2. remember the received global model w, call the wrapped app, read its trained model w';
3. Δ = w' − w; with client error feedback, z = compensate(Δ, r) (classic EF, Karimireddy et al.
   2019; weighted EF z = Δ + β r, Abdi thesis eq. 4.14), else z = Δ;
4. p = codec.encode(z) with the client's seeds: the round's common seed and the client id
   (``protocol.codec_seeds``: the client's own randomness is independent of the other clients');
5. with error feedback, r ← update(r, z, decode(p)) kept under the client id in the residual store
   the config names (fl_sim.clients.residuals: the node's ``context.state`` by default, or the
   run's disk store);
6. replace the reply's arrays with p's tensors, add the payload record and ``uplink-bits``.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, MetricRecord

from .. import keys
from ..compression import error_feedback as ef_lib
from ..protocol import DEFAULT_SEED_MODE, codec_seeds, get_codec, load_params
from ..records import flatten_arrays, payload_to_records
from .residuals import store_for

__all__ = ["compression_mod", "make_error_feedback"]


def make_error_feedback(kind: str, beta: float = 1.0):
    """The client memory piece named in the config: None, classic EF or Abdi's weighted EF."""
    if kind in ("", "none"):
        return None
    if kind == "classic":
        return ef_lib.ErrorFeedback()
    if kind == "weighted":
        return ef_lib.WeightedErrorFeedback(beta=beta)
    raise ValueError(f"error feedback {kind!r} unknown; use none, classic or weighted")


def compression_mod(message: Message, context: Context, call_next) -> Message:
    """Encode the update of a train reply with the codec named in the message config."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    config = message.content.get(keys.CONFIG)
    if config is None or keys.CODEC not in config:
        return call_next(message, context)
    received = flatten_arrays(message.content[keys.ARRAYS])  # copy: the app may modify its input
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    local = flatten_arrays(reply.content[keys.ARRAYS])
    if local.shape != received.shape:
        raise ValueError(
            f"compression_mod: the ClientApp returned {local.numel()} parameters but received {received.numel()}"
        )
    if keys.CID in config:
        cid = int(config[keys.CID])
    else:
        cid = int(context.node_config.get("partition-id", 0))
    codec = get_codec(str(config[keys.CODEC]), received.numel(), load_params(str(config.get(keys.CODEC_PARAMS, ""))))
    seeds = codec_seeds(int(config[keys.SEED]), str(config.get(keys.SEED_MODE, DEFAULT_SEED_MODE)), cid)
    delta = local - received
    memory = make_error_feedback(str(config.get(keys.EF, "none")), float(config.get(keys.EF_BETA, 1.0)))
    if memory is None:
        z = delta
        payload = codec.encode_seeded(z, seeds)
    else:
        store = store_for(config, context)
        residual = store.load(cid)
        z = memory.compensate(delta, residual)
        payload = codec.encode_seeded(z, seeds)
        store.save(cid, memory.update(residual, z, codec.decode_seeded(payload, seeds)))
    arrays, meta = payload_to_records(payload)
    reply.content[keys.ARRAYS] = arrays
    reply.content[keys.PAYLOAD_META] = meta
    metrics = reply.content.get(keys.METRICS) or MetricRecord()
    metrics[keys.UPLINK_BITS] = int(payload.bits)
    if config.get(keys.REPORT_NORM):
        metrics[keys.UPDATE_NORM] = float(z.norm())
    if keys.M_CID not in metrics:
        metrics[keys.M_CID] = cid
    reply.content[keys.METRICS] = metrics
    return reply
