"""``secagg_mod``: the client half of SecAgg+ ([Bell-2020]) for Message-API strategies.

Install it *outside* ``compression_mod`` so that it sees the encoded payload:
``ClientApp(train_fn, mods=[secagg_mod, compression_mod])`` (Flower calls the first mod first; its
``call_next`` runs compression_mod, which runs the app). In the other order the masked-vector stage
fails at once with an error naming the fix.

A message without the ``fl-sim.secagg`` ConfigRecord passes through untouched. The four stages
(``fl_sim.strategies.secagg`` sends them), with one client's state kept in ``context.state`` under
``fl-sim.secagg.<client id>`` between them:

1. setup: two X25519 key pairs (sk1, pk1) for the pairwise masks and (sk2, pk2) for encrypting shares;
   reply pk1, pk2;
2. share_keys: given its neighbours' public keys, draw the self-mask seed b_i, Shamir-share b_i and
   sk1 into t-of-n shares, encrypt neighbour j's pair with the key agreed from (sk2_i, pk2_j); reply
   the ciphertexts (the server forwards them);
3. collect_masked_vectors: decrypt the shares received, train (``call_next``: compression_mod and the
   app), take the payload's float tensors (or Δ_i = w_i − w without a codec), weight them by n_i / W,
   put them into the field (``fl_sim.wire.secagg.to_field``, with n_i and the weighted train loss as
   extra entries), add PRG(b_i) and ±PRG(s_ij) for every neighbour j that shared keys (+ when
   sid_i > sid_j), reply the masked vector y_i mod M, never the payload;
4. unmask: reply the shares of b_j for surviving neighbours and of sk1_j for dropped ones (never both
   for one j), then forget the round.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fl_sim.rng import torch_generator
from fl_sim.wire import keys
from fl_sim.wire.protocol import DEFAULT_SEED_MODE, codec_seeds, get_codec, load_params
from fl_sim.wire.records import array_bits, flatten_arrays, payload_from_records, summed_payload_to_records
from fl_sim.wire.secagg import MASKED, RECORD, STATE_PREFIX, SecAggKey as K, Stage, field_dtype, prg_mask, to_field

__all__ = ["secagg_mod"]

ORDER_ERROR = ("secagg_mod: the reply carries no encoded payload although the config names codec {codec!r}; "
               "secagg_mod must come before compression_mod: ClientApp(mods=[secagg_mod, compression_mod])")


def _train_config(content: RecordDict) -> ConfigRecord:
    """The train message's ConfigRecord: fl-sim's (it holds the round seed), else "config", else the first
    one (a plain Flower strategy's), else an empty one."""
    records = [(k, v) for k, v in content.items() if isinstance(v, ConfigRecord) and k != RECORD]
    for k, v in records:
        if keys.SEED in v:
            return v
    return dict(records).get(keys.CONFIG) or (records[0][1] if records else ConfigRecord())


LOSS_KEYS = (keys.TRAIN_LOSS, "train_loss")  # fl-sim's name, and Flower's examples'


def _state(context: Context, cid: int) -> ConfigRecord:
    name = f"{STATE_PREFIX}{cid}"
    if name not in context.state:
        context.state[name] = ConfigRecord()
    return context.state[name]


def _reply(message: Message, record: ConfigRecord, extra: dict | None = None) -> Message:
    record[K.SID] = int(message.content[RECORD][K.SID])  # the server maps replies by secure id
    content = RecordDict({RECORD: record, **(extra or {})})
    return Message(content, reply_to=message)


def _setup(st: ConfigRecord, cfg: ConfigRecord) -> ConfigRecord:
    for name in (K.SID, K.THRESHOLD, K.CLIPPING_RANGE, K.TARGET_RANGE, K.MOD_RANGE, K.MAX_WEIGHT):
        st[name] = cfg[name]
    st[K.WEIGHT_KEY] = str(cfg.get(K.WEIGHT_KEY, keys.NUM_EXAMPLES))
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    st["sk1"], st[K.PK1] = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    st["sk2"], st[K.PK2] = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    return ConfigRecord({K.PK1: st[K.PK1], K.PK2: st[K.PK2]})


def _share_keys(st: ConfigRecord, cfg: ConfigRecord) -> ConfigRecord:
    sid, t = int(st[K.SID]), int(st[K.THRESHOLD])
    sids = [int(s) for s in cfg[K.SIDS]]
    pk1s, pk2s = list(cfg[K.PK1S]), list(cfg[K.PK2S])
    if len(sids) < t:
        raise ValueError(f"secagg_mod: {len(sids)} neighbours shared keys, fewer than the threshold t={t}")
    if len(set(pk1s + pk2s)) != 2 * len(sids):
        raise ValueError("secagg_mod: two neighbours announced the same public key")
    me = sids.index(sid)
    if pk1s[me] != st[K.PK1] or pk2s[me] != st[K.PK2]:
        raise ValueError("secagg_mod: the server relayed this client's own public keys wrongly")
    st["rd_seed"] = os.urandom(32)
    b_shares = create_shares(bytes(st["rd_seed"]), t, len(sids))
    sk1_shares = create_shares(bytes(st["sk1"]), t, len(sids))
    sk2 = bytes_to_private_key(bytes(st["sk2"]))
    dsts, ctxts, agreed = [], [], []
    st[K.SIDS], st[K.PK1S] = sids, pk1s
    st["b_owners"], st["b_shares"] = [sid], [b_shares[me]]
    st["sk_owners"], st["sk_shares"] = [sid], [sk1_shares[me]]
    for j, (other, pk2) in enumerate(zip(sids, pk2s)):
        if other == sid:
            agreed.append(b"")
            continue
        key = generate_shared_key(sk2, bytes_to_public_key(pk2))
        agreed.append(key)
        dsts.append(other)
        ctxts.append(encrypt(key, share_keys_plaintext_concat(sid, other, b_shares[j], sk1_shares[j])))
    st["ss2"] = agreed
    return ConfigRecord({K.DSTS: dsts, K.CTXTS: ctxts})


def _receive_shares(st: ConfigRecord, cfg: ConfigRecord) -> list[int]:
    """Decrypt the forwarded shares; returns the neighbours that shared keys (they mask with us)."""
    sid, t = int(st[K.SID]), int(st[K.THRESHOLD])
    srcs, ctxts = [int(s) for s in cfg[K.SRCS]], list(cfg[K.CTXTS])
    if len(srcs) + 1 < t:
        raise ValueError(f"secagg_mod: {len(srcs)} neighbours left after sharing keys; the threshold is t={t}")
    sids, agreed = [int(s) for s in st[K.SIDS]], list(st["ss2"])
    b_owners, b_shares = list(st["b_owners"]), list(st["b_shares"])
    sk_owners, sk_shares = list(st["sk_owners"]), list(st["sk_shares"])
    for src, ctxt in zip(srcs, ctxts, strict=True):
        if src not in sids or src == sid:
            raise ValueError(f"secagg_mod: a share from {src}, who is not a neighbour")
        actual, dst, b_share, sk_share = share_keys_plaintext_separate(decrypt(agreed[sids.index(src)], ctxt))
        if actual != src or dst != sid:
            raise ValueError(f"secagg_mod: a share from {actual} to {dst} was relayed as from {src} to {sid}")
        b_owners.append(src), b_shares.append(b_share)
        sk_owners.append(src), sk_shares.append(sk_share)
    st["b_owners"], st["b_shares"], st["sk_owners"], st["sk_shares"] = b_owners, b_shares, sk_owners, sk_shares
    return srcs


def _summable_form(arrays: ArrayRecord, meta: ConfigRecord, train_cfg: ConfigRecord):
    """(arrays, meta) of the form the server sums: the payload itself, or for a codec with per-client
    randomness removed in the sum ("mixed" seeding: 1-bit CS with a common Φ) its one-client aggregate
    ``aggregate_seeded([p], [1], [seeds])`` (dequantized measurements with the client's own dither
    removed, and its scales): linear in the weights, so the masked sum is the server's aggregate."""
    codec = get_codec(str(meta[keys.P_CODEC]), int(meta[keys.P_DIM]), load_params(str(train_cfg.get(keys.CODEC_PARAMS, ""))))
    if codec.seed_scope != "mixed":
        return arrays, meta
    cid = int(meta.get(keys.P_CID, train_cfg.get(keys.CID, 0)))
    seeds = codec_seeds(int(train_cfg[keys.SEED]), str(train_cfg.get(keys.SEED_MODE, DEFAULT_SEED_MODE)), cid)
    summed = codec.aggregate_seeded([payload_from_records(arrays, meta, codec)], [1.0], [seeds])
    out, summed_meta = summed_payload_to_records(summed)
    summed_meta[keys.P_BITS] = int(meta[keys.P_BITS])  # what the client would have sent in plaintext
    summed_meta[keys.P_CID] = cid
    return out, summed_meta


def _plain_vector(reply: Message, train_cfg: ConfigRecord, received: torch.Tensor | None):
    """(entries x, tensor names, shapes, dtypes, payload meta, or the plain model's bits without a codec) of
    what the client would send."""
    meta = reply.content.get(keys.PAYLOAD_META)
    wanted = str(train_cfg.get(keys.ARRAYRECORD_KEY, keys.ARRAYS))
    arrays = reply.content.get(wanted)
    if not isinstance(arrays, ArrayRecord):
        arrays = next(v for v in reply.content.values() if isinstance(v, ArrayRecord))
    if isinstance(meta, ConfigRecord):
        arrays, meta = _summable_form(arrays, meta, train_cfg)
        names, shapes, dtypes, parts = [], [], [], []
        for name, arr in arrays.items():
            nd = arr.numpy()
            if not np.issubdtype(nd.dtype, np.floating):
                raise ValueError(f"secagg_mod: payload tensor {name!r} is {nd.dtype}; only float tensors sum "
                                 f"under masks (codec {meta.get(keys.P_CODEC)!r} is not a linear one)")
            names.append(name), shapes.append(list(nd.shape)), dtypes.append(str(nd.dtype))
            parts.append(torch.from_numpy(np.ascontiguousarray(nd, dtype=np.float64)).reshape(-1))
        return torch.cat(parts), names, shapes, dtypes, meta
    if keys.CODEC in train_cfg:
        raise ValueError(ORDER_ERROR.format(codec=str(train_cfg[keys.CODEC])))
    local = flatten_arrays(arrays).to(torch.float64)
    return local - received.to(torch.float64), [], [], [], array_bits(arrays)


def _collect(st: ConfigRecord, cfg: ConfigRecord, message: Message, context: Context, call_next) -> Message:
    srcs = _receive_shares(st, cfg)
    train_cfg = _train_config(message.content)
    content = RecordDict({k: v for k, v in message.content.items() if k != RECORD})
    inner = copy.copy(message)  # same metadata, the train content without the stage record
    inner.content = content
    received = None
    if keys.CODEC not in train_cfg:
        wanted = str(train_cfg.get(keys.ARRAYRECORD_KEY, keys.ARRAYS))
        arrays = content.get(wanted)
        if not isinstance(arrays, ArrayRecord):
            raise ValueError(f"secagg_mod: the train message has no model under {wanted!r} to form Δ = w_i − w "
                             "against (a sparse model broadcast suits the K-sparse methods, not a full-model one)")
        received = flatten_arrays(arrays)
    reply = call_next(inner, context)
    if reply.has_error():
        return reply
    x, names, shapes, dtypes, meta = _plain_vector(reply, train_cfg, received)
    metrics = next((v for v in reply.content.values() if isinstance(v, MetricRecord)), MetricRecord())
    wkey = str(st[K.WEIGHT_KEY])
    if wkey not in metrics:
        raise ValueError(f"secagg_mod: the reply lacks the metric {wkey!r} (the weight n_i)")
    n_i = float(metrics[wkey])
    if n_i < 0 or not float(n_i).is_integer():
        raise ValueError(f"secagg_mod: weight {wkey}={n_i} must be a whole number >= 0 (it is summed exactly)")
    c, T, M, W = float(st[K.CLIPPING_RANGE]), int(st[K.TARGET_RANGE]), int(st[K.MOD_RANGE]), float(st[K.MAX_WEIGHT])
    loss_key = next((k for k in LOSS_KEYS if k in metrics), "")
    entries = torch.cat([x, torch.tensor([float(metrics[loss_key])] if loss_key else [],
                                         dtype=torch.float64)]) * (n_i / W)
    cid = int(train_cfg.get(keys.CID, context.node_config.get("partition-id", 0)))
    # the rounding's randomness: reproducible from the round seed of an fl-sim strategy, else fresh
    seed = int(train_cfg[keys.SEED]) if keys.SEED in train_cfg else int.from_bytes(os.urandom(7), "little")
    gen = torch_generator(seed, "secagg-rounding", cid)
    q, clipped = to_field(entries, c, T, gen)
    y = np.concatenate([q, np.array([int(n_i)], dtype=np.int64)]) % M
    sid = int(st[K.SID])
    y = (y + prg_mask(bytes(st["rd_seed"]), M, y.size)) % M
    sk1 = bytes_to_private_key(bytes(st["sk1"]))
    sids, pk1s = [int(s) for s in st[K.SIDS]], list(st[K.PK1S])
    for other in srcs:
        s_ij = generate_shared_key(sk1, bytes_to_public_key(pk1s[sids.index(other)]))
        mask = prg_mask(s_ij, M, y.size)
        y = (y + mask) % M if sid > other else (y - mask) % M
    out = ConfigRecord({K.NAMES: names, K.SHAPES: json.dumps(shapes), K.DTYPES: dtypes, K.HAS_LOSS: loss_key})
    plain_bits = int(meta[keys.P_BITS]) if isinstance(meta, ConfigRecord) else int(meta)
    masked_metrics = MetricRecord({keys.M_CID: cid, K.CLIPPED: clipped, keys.UPLINK_BITS: plain_bits})
    extra = {MASKED: ArrayRecord({"y": Array(y.astype(field_dtype(M)))}), keys.METRICS: masked_metrics}
    if isinstance(meta, ConfigRecord):
        extra[keys.PAYLOAD_META] = meta
    # the reply's other ConfigRecords (what compression_mod adds beside the payload, e.g. the round it
    # answers) travel as they are: they say nothing about the update
    for name, record in reply.content.items():
        if isinstance(record, ConfigRecord) and name not in (keys.PAYLOAD_META, RECORD):
            extra[name] = record
    return _reply(message, out, extra)


def _unmask(st: ConfigRecord, cfg: ConfigRecord) -> ConfigRecord:
    active, dead = [int(s) for s in cfg[K.ACTIVE]], [int(s) for s in cfg[K.DEAD]]
    t = int(st[K.THRESHOLD])
    if len(active) < t:
        raise ValueError(f"secagg_mod: {len(active)} neighbours survive, fewer than the threshold t={t}")
    if set(active) & set(dead):
        raise ValueError("secagg_mod: the server asked for both shares of one neighbour")
    b = dict(zip((int(o) for o in st["b_owners"]), st["b_shares"]))
    sk = dict(zip((int(o) for o in st["sk_owners"]), st["sk_shares"]))
    owners = [s for s in active if s in b] + [s for s in dead if s in sk]
    shares = [b[s] for s in active if s in b] + [sk[s] for s in dead if s in sk]
    return ConfigRecord({K.SHARE_OWNERS: owners, K.SHARES: shares})


def secagg_mod(message: Message, context: Context, call_next) -> Message:
    """Answer SecAgg+'s stage messages; pass every other message on untouched."""
    cfg = message.content.get(RECORD)
    if message.metadata.message_type != MessageType.TRAIN or not isinstance(cfg, ConfigRecord):
        return call_next(message, context)
    stage = str(cfg[K.STAGE])
    cid = int(cfg[keys.CID]) if keys.CID in cfg else int(context.node_config.get("partition-id", 0))
    st = _state(context, cid)
    if stage == Stage.SETUP:
        st.clear()
        out = _reply(message, _setup(st, cfg))
        st["stage"] = stage
        return out
    if stage not in Stage.ALL:
        raise ValueError(f"secagg_mod: unknown stage {stage!r}")
    if str(st.get("stage", "")) != Stage.ALL[Stage.ALL.index(stage) - 1]:
        raise ValueError(f"secagg_mod: stage {stage!r} after {st.get('stage', 'nothing')!r}")
    if stage == Stage.SHARE_KEYS:
        out = _reply(message, _share_keys(st, cfg))
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        out = _collect(st, cfg, message, context, call_next)
    else:
        out = _reply(message, _unmask(st, cfg))
        del context.state[f"{STATE_PREFIX}{cid}"]
        return out
    st["stage"] = stage
    return out
