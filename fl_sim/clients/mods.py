"""``compression_mod``: a ClientApp mod that turns a train reply's model into an encoded update.

Works around any ClientApp that returns a model (``ClientApp(mods=[compression_mod])``):

0. a train message of a sparse model broadcast (fl_sim.clients.broadcast) gets its model rebuilt from the
   node's copy of the previous one; a versioned model is kept, and the reply says which version is held;
1. pass non-train messages through untouched, and train messages whose config names no codec with only
   step 7;
2. remember the received global model w, call the wrapped app, read its trained model w';
3. Δ = w' − w; with client error feedback, z = compensate(Δ, r) (classic EF, Karimireddy et al.
   2019; weighted EF z = Δ + β r, [Abdi-thesis] eq. 4.14), else z = Δ;
4. p = codec.encode(z) with the client's seeds: the round's common seed and the client id
   (``protocol.codec_seeds``: the client's own randomness is independent of the other clients');
5. with error feedback, r ← update(r, z, decode(p)) kept under the client id in the residual store
   the config names (fl_sim.clients.residuals: the node's ``context.state`` by default, or the
   run's disk store);
6. replace the reply's arrays (the ArrayRecord named by the strategy's arrayrecord_key, or the only
   one) with p's packed arrays (``codec.wire_arrays``), add the payload record (with the client id) and
   ``uplink-bits`` (8 x those arrays' bytes, what the server counts) beside the app's own metrics, which
   are otherwise untouched;
7. on every reply to an fl-sim train message (its config carries the strategy's ``arrayrecord_key``),
   add the reply record ``fl-sim.reply`` with the round the message named (keys.ROUND): the server
   rejects a reply that answers another round (a stale or replayed one) or says none.

Differential privacy (Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod``, with a client-side DP
wrapper on the server): the clipping mod must clip the trained model before this mod encodes it, so
it comes *after* this one: ``ClientApp(mods=[compression_mod, fixedclipping_mod])``. In the other
order the clipping mod would get the encoded payload back (and fail on it); this mod finds the
clipping mod around it and answers with an error reply naming the right order (the server's first
round then stops the run: fl_sim.strategies.base.ClientSetupError). docs/privacy.md.

Steps 3-5 may have been done ahead for the message, as one block for a chunk of clients, by the
vectorized grid (fl_sim.clients.cohort_encode; the same numbers): then the mod takes that payload
(``precomputed`` kind "encode") and does step 6 only.
"""

from __future__ import annotations

import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_sim.wire import keys
from fl_sim.compression import error_feedback as ef_lib
from fl_sim.wire.protocol import DEFAULT_SEED_MODE, codec_seeds, get_codec, load_params
from fl_sim.wire.records import array_bits, flatten_arrays, payload_to_records
from fl_sim.clients.broadcast import hold_model, receive_model
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


def _config_with(message: Message, key: str):
    """The ConfigRecord holding ``key`` (the strategy's configrecord_key may be any name), or None."""
    # direct lookups: RecordDict.config_records builds (and type-checks) a new dict on every access
    config = message.content.get(keys.CONFIG)
    if isinstance(config, ConfigRecord) and key in config:
        return config
    return next((c for c in _records(message.content, ConfigRecord).values() if key in c), None)


def _find_config(message: Message):
    """The ConfigRecord that names a codec."""
    return _config_with(message, keys.CODEC)


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


def _clipping_mods() -> dict:
    """code object -> name of Flower's clipping mods (Message API, and the legacy ones where present)."""
    found = {}
    for module in ("flwr.clientapp.mod", "flwr.client.mod"):
        try:
            mods = __import__(module, fromlist=["fixedclipping_mod", "adaptiveclipping_mod"])
        except ImportError:
            continue
        for name in ("fixedclipping_mod", "adaptiveclipping_mod"):
            fn = getattr(mods, name, None)
            if fn is not None and hasattr(fn, "__code__"):
                found[fn.__code__] = name
    return found


def _clipping_mod_around(depth: int = 40) -> str | None:
    """The name of a Flower clipping mod that is calling this mod (a mod listed before compression_mod in
    ``ClientApp(mods=[...])`` calls it through Flower's ``make_ffn`` wrappers), or None."""
    codes = _clipping_mods()
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code in codes:
            return codes[frame.f_code]
        frame = frame.f_back
    return None


def mod_client_id(config, context: Context) -> int:
    """The client id the mod encodes for: the config's, else the node's partition-id (deployment)."""
    if keys.CID in config:
        return int(config[keys.CID])
    return int(context.node_config.get("partition-id", 0))


def _codec(config, dim: int):
    return get_codec(str(config[keys.CODEC]), dim, load_params(str(config.get(keys.CODEC_PARAMS, ""))))


def _encode_reply(config, context: Context, cid: int, received, local):
    """Steps 3-5 for one reply: (payload, z)."""
    if local.shape != received.shape:
        raise ValueError(
            f"compression_mod: the ClientApp returned {local.numel()} parameters but received {received.numel()}"
        )
    codec = _codec(config, received.numel())
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


def _round_config(message: Message):
    """The ConfigRecord an fl-sim strategy sent (it names the arrayrecord_key and the round), or None."""
    return _config_with(message, keys.ARRAYRECORD_KEY)


def _answer_round(reply: Message, sent) -> Message:
    """Step 7: the reply says which round it answers (``fl-sim.reply``), unless it is an error reply."""
    if sent is not None and keys.ROUND in sent and not reply.has_error():
        reply.content[keys.REPLY_META] = ConfigRecord({keys.R_ROUND: int(sent[keys.ROUND])})
    return reply


def compression_mod(message: Message, context: Context, call_next) -> Message:
    """Encode the update of a train reply with the codec named in the message config; tie every train
    reply to the round it answers."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    version = receive_model(message, context)  # a sparse broadcast rebuilt; a versioned model kept
    if version is not None:
        return hold_model(_compression_mod(message, context, call_next), version)
    return _compression_mod(message, context, call_next)


def _compression_mod(message: Message, context: Context, call_next) -> Message:
    config = _find_config(message)
    if config is None:
        return _answer_round(call_next(message, context), _round_config(message))
    if KEY_CLIPPING_NORM in config and (clipper := _clipping_mod_around()) is not None:
        reason = (f"compression_mod runs inside {clipper}, which would clip the encoded payload instead of the update; "
                  f"list compression_mod first: ClientApp(mods=[compression_mod, {clipper}]) (the update is then "
                  f"clipped before it is compressed)")
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=message)
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
    arrays, meta = payload_to_records(payload, _codec(config, payload.dim))
    meta[keys.P_CID] = cid
    del reply.content[out_key]
    reply.content[out_key] = arrays
    reply.content[keys.PAYLOAD_META] = meta
    # The app's own metrics stay as they are; fl-sim adds its per-client figures beside them.
    present = _records(reply.content, MetricRecord)
    mkey = keys.METRICS if keys.METRICS in present or not present else next(iter(present))
    metrics = present.get(mkey) or MetricRecord()
    metrics[keys.UPLINK_BITS] = array_bits(arrays)  # 8 x the packed arrays' bytes: what the server counts
    if config.get(keys.REPORT_NORM):
        metrics[keys.UPDATE_NORM] = z_norm
    reply.content[mkey] = metrics
    return _answer_round(reply, config)
