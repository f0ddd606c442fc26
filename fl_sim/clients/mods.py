"""``compression_mod``: a ClientApp mod that turns a train reply's model into an encoded update.

Works around any ClientApp that returns a model (``ClientApp(mods=[compression_mod])``):

1. pass non-train messages, and train messages whose config names no codec, through untouched;
2. remember the received global model w, call the wrapped app, read its trained model w';
3. Δ = w' − w; with client error feedback, z = compensate(Δ, r) (classic EF, Karimireddy et al.
   2019; weighted EF z = Δ + β r, [Abdi-thesis] eq. 4.14), else z = Δ;
4. p = codec.encode(z) with the client's seeds: the round's common seed and the client id
   (``protocol.codec_seeds``: the client's own randomness is independent of the other clients');
5. with error feedback, r ← update(r, z, decode(p)) kept under the client id in the residual store
   the config names (fl_sim.clients.residuals: the node's ``context.state`` by default, or the
   run's disk store);
6. replace the reply's arrays (the ArrayRecord named by the strategy's arrayrecord_key, or the only
   one) with p's tensors, add the payload record (with the client id) and ``uplink-bits`` beside the
   app's own metrics, which are otherwise untouched.

Steps 3-5 may have been done ahead for the message, as one block for a chunk of clients, by the
vectorized grid (fl_sim.clients.cohort_encode; the same numbers): then the mod takes that payload
(``precomputed`` kind "encode") and does step 6 only.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord

from fl_sim.wire import keys
from fl_sim.compression import error_feedback as ef_lib
from fl_sim.wire.protocol import DEFAULT_SEED_MODE, codec_seeds, get_codec, load_params
from fl_sim.wire.records import flatten_arrays, payload_to_records
from fl_sim.clients.precomputed import take
from fl_sim.clients.residuals import store_for

__all__ = ["compression_mod", "make_error_feedback", "mod_client_id"]


def make_error_feedback(kind: str, beta: float = 1.0):
    """The client memory piece named in the config: None, classic EF or Abdi's weighted EF."""
    if kind in ("", "none"):
        return None
    if kind == "classic":
        return ef_lib.ErrorFeedback()
    if kind == "weighted":
        return ef_lib.WeightedErrorFeedback(beta=beta)
    raise ValueError(f"error feedback {kind!r} unknown; use none, classic or weighted")


def _find_config(message: Message):
    """The ConfigRecord that names a codec (the strategy's configrecord_key may be any name)."""
    # direct lookups: RecordDict.config_records builds (and type-checks) a new dict on every access
    config = message.content.get(keys.CONFIG)
    if isinstance(config, ConfigRecord) and keys.CODEC in config:
        return config
    return next((c for c in _records(message.content, ConfigRecord).values() if keys.CODEC in c), None)


def _records(content, kind) -> dict:
    """The records of one kind in a RecordDict, in order (what ``content.<kind>_records`` holds)."""
    return {k: v for k, v in content.items() if isinstance(v, kind)}


def _arrays_key(content, wanted: str) -> str:
    """The ArrayRecord holding the model: ``wanted`` (the strategy's arrayrecord_key), else the only one."""
    if isinstance(content.get(wanted), ArrayRecord):
        return wanted
    names = list(_records(content, ArrayRecord))
    if len(names) != 1:
        raise ValueError(f"compression_mod: expected the model under {wanted!r} or one ArrayRecord, found {names}")
    return names[0]


def mod_client_id(config, context: Context) -> int:
    """The client id the mod encodes for: the config's, else the node's partition-id (deployment)."""
    if keys.CID in config:
        return int(config[keys.CID])
    return int(context.node_config.get("partition-id", 0))


def _encode_reply(config, context: Context, cid: int, received, local):
    """Steps 3-5 for one reply: (payload, z)."""
    if local.shape != received.shape:
        raise ValueError(
            f"compression_mod: the ClientApp returned {local.numel()} parameters but received {received.numel()}"
        )
    codec = get_codec(str(config[keys.CODEC]), received.numel(), load_params(str(config.get(keys.CODEC_PARAMS, ""))))
    seeds = codec_seeds(int(config[keys.SEED]), str(config.get(keys.SEED_MODE, DEFAULT_SEED_MODE)), cid)
    delta = local - received
    memory = make_error_feedback(str(config.get(keys.EF, "none")), float(config.get(keys.EF_BETA, 1.0)))
    if memory is None:
        return codec.encode_seeded(delta, seeds), delta
    store = store_for(config, context)
    residual = store.load(cid)
    z = memory.compensate(delta, residual)
    payload = codec.encode_seeded(z, seeds)
    store.save(cid, memory.update(residual, z, codec.decode_seeded(payload, seeds)))
    return payload, z


def compression_mod(message: Message, context: Context, call_next) -> Message:
    """Encode the update of a train reply with the codec named in the message config."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    config = _find_config(message)
    if config is None:
        return call_next(message, context)
    wanted = str(config.get(keys.ARRAYRECORD_KEY, keys.ARRAYS))
    cid = mod_client_id(config, context)
    done = take("encode", message, cid)  # steps 3-5 done as a block by the vectorized grid
    if done is None:
        received = flatten_arrays(message.content[_arrays_key(message.content, wanted)])  # a copy: the app may modify it
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    out_key = _arrays_key(reply.content, wanted)
    if done is not None:
        payload, z_norm = done.payload, done.norm
    else:
        payload, z = _encode_reply(config, context, cid, received, flatten_arrays(reply.content[out_key]))
        z_norm = float(z.norm()) if config.get(keys.REPORT_NORM) else None
    arrays, meta = payload_to_records(payload)
    meta[keys.P_CID] = cid
    del reply.content[out_key]
    reply.content[out_key] = arrays
    reply.content[keys.PAYLOAD_META] = meta
    # The app's own metrics stay as they are; fl-sim adds its per-client figures beside them.
    present = _records(reply.content, MetricRecord)
    mkey = keys.METRICS if keys.METRICS in present or not present else next(iter(present))
    metrics = present.get(mkey) or MetricRecord()
    metrics[keys.UPLINK_BITS] = int(payload.bits)
    if config.get(keys.REPORT_NORM):
        metrics[keys.UPDATE_NORM] = z_norm
    reply.content[mkey] = metrics
    return reply
