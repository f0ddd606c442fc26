"""Client-side encoding of a chunk of clients as one block (``simulation.backend: vectorized``).

After :func:`fl_sim.clients.cohort.train_cohort` the vectorized grid holds a chunk's trained parameters
as one tensor per model parameter. ``compression_mod`` would then encode each reply on its own (steps 3-5
of fl_sim.clients.mods); :func:`encode_cohort` does those steps for the whole chunk at once, with the
same numbers:

1. Δ = w'_i − w for every client i of the chunk, a block (C, d) (w: the client's received global model,
   flattened as the mod flattens it);
2. with client error feedback, the residuals r_i are read from the residual store as one block
   (``load_many``) and z_i = compensate(Δ_i, r_i) for the clients that have one (z_i = Δ_i otherwise);
3. p_i = the codec's ``encode_batch`` of the block with each client's seeds (one transform or one
   quantization for the cohort; each client's own randomness from its own generator);
4. with error feedback, r_i ← update(r_i, z_i, decode(p_i)) by ``decode_batch`` (``roundtrip_batch``), written back as one
   block (``save_many``);
5. each p_i is left under ``precomputed_key("encode", message, cid)``; ``compression_mod`` takes it and
   builds the reply's records exactly as it does for a payload it encoded itself.

The error-feedback classes are element-wise tensor functions, so a (C, d) block gives each row what the
one-vector call gives. Which messages qualify, and why the others still go through the mod one by one:

* the app must be fl-sim's own with ``compression_mod`` as its one mod (:func:`applies`): a user's mods
  could change the reply between the app and the encoding;
* the message's config names a codec (the mod's ``_find_config``), its model is the record the chunk
  trained from, and its client id is the one the mod would encode for;
* a client id that appears twice in one send (its residual would be read before its first reply
  updated it) is left to the mod.

A failure in steps 1-3 leaves nothing behind (the mod then encodes those replies itself); residuals are
written only once every payload of the group is made.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from flwr.app import Context, Message

from fl_sim.wire import keys
from fl_sim.compression import Payload
from fl_sim.wire.protocol import DEFAULT_SEED_MODE, codec_seeds, get_codec, load_params
from fl_sim.wire.records import flatten_arrays
from fl_sim.clients.mods import _arrays_key, _find_config, compression_mod, make_error_feedback, mod_client_id
from fl_sim.clients.precomputed import precomputed_key
from fl_sim.clients.residuals import ContextResidualStore, store_for

__all__ = ["EncodedUpdate", "applies", "encode_cohort"]


@dataclass(frozen=True)
class EncodedUpdate:
    """A client's encoded update made ahead of its reply: the payload and ||z||_2 when the config asks for it."""

    payload: Payload
    norm: float | None = None


def applies(client_app) -> bool:
    """True when the app is fl-sim's own with exactly ``[compression_mod]`` as its mods."""
    return getattr(client_app, "fl_sim_runtime", None) is not None and \
        tuple(getattr(client_app, "fl_sim_mods", ())) == (compression_mod,)


def _group_key(config) -> tuple:
    """Messages whose replies one batched call may encode: same codec, parameters and memory."""
    return (str(config[keys.CODEC]), str(config.get(keys.CODEC_PARAMS, "")), str(config.get(keys.EF, "none")),
            float(config.get(keys.EF_BETA, 1.0)), bool(config.get(keys.REPORT_NORM)))


def encode_cohort(
    msgs: Sequence[Message],
    contexts: Sequence[Context],
    cids: Sequence[int],
    local: torch.Tensor,
    *,
    skip: set[int] = frozenset(),
) -> dict[tuple, EncodedUpdate]:
    """Steps 1-5 (module docstring) for a chunk: ``local`` (C, d) holds the clients' trained parameters,
    flattened in the record's order; ``msgs``, ``contexts`` and ``cids`` the clients' train messages, node
    contexts and ids (as the grid trained them). ``skip``: client ids left to the mod. Returns the
    precomputed entries (kind "encode") of the messages it encoded."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    configs = {}
    for j, (msg, ctx, cid) in enumerate(zip(msgs, contexts, cids)):
        config = _find_config(msg)
        if config is None or cid in skip or mod_client_id(config, ctx) != cid:
            continue
        wanted = str(config.get(keys.ARRAYRECORD_KEY, keys.ARRAYS))
        if msg.content.get(_arrays_key(msg.content, wanted)) is not msg.content.get(keys.ARRAYS):
            continue  # the mod would encode against another record than the one the client trained from
        configs[j] = config
        groups[_group_key(config)].append(j)
    out: dict[tuple, EncodedUpdate] = {}
    received: dict[int, torch.Tensor] = {}  # one flatten per distinct global-model record
    for (name, params, ef, beta, report), rows in groups.items():
        for j in rows:
            record = msgs[j].content[keys.ARRAYS]
            if id(record) not in received:
                received[id(record)] = flatten_arrays(record)
        ids = {id(msgs[j].content[keys.ARRAYS]) for j in rows}
        w = received[ids.pop()] if len(ids) == 1 else torch.stack([received[id(msgs[j].content[keys.ARRAYS])] for j in rows])
        if w.shape[-1] != local.shape[1]:
            raise ValueError(f"encode_cohort: the clients trained {local.shape[1]} parameters but received {w.shape[-1]}")
        delta = _rows(local, rows) - w  # 1. Δ (C, d); w (d,) broadcasts, or (C, d) when the records differ
        codec = get_codec(name, local.shape[1], load_params(params))
        seeds = [codec_seeds(int(configs[j][keys.SEED]), str(configs[j].get(keys.SEED_MODE, DEFAULT_SEED_MODE)),
                             int(cids[j])) for j in rows]
        memory = make_error_feedback(ef, beta)
        if memory is None:
            z = delta
            payloads = codec.encode_batch(z, seeds)  # 3.
        else:
            payloads, z = _with_error_feedback(codec, memory, delta, seeds,
                                               [(configs[j], contexts[j], int(cids[j])) for j in rows])
        for n, j in enumerate(rows):
            norm = float(z[n].norm()) if report else None
            out[precomputed_key("encode", msgs[j], int(cids[j]))] = EncodedUpdate(payloads[n], norm)
    return out


def _stores(clients: Sequence[tuple]) -> list[tuple[object, list[int]]]:
    """(store, row positions) per residual store; one store object per node context for the context store."""
    by_key: dict[tuple, tuple[object, list[int]]] = {}
    for n, (config, ctx, _cid) in enumerate(clients):
        store = store_for(config, ctx)
        key = ("context", id(ctx), store.dtype) if isinstance(store, ContextResidualStore) else ("store", id(store))
        by_key.setdefault(key, (store, []))[1].append(n)
    return list(by_key.values())


def _rows(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t[rows] without an index kernel where a view serves (all rows, or one: the common cases)."""
    if len(rows) == t.shape[0] and rows == list(range(t.shape[0])):
        return t
    if len(rows) == 1:
        return t[rows[0] : rows[0] + 1]
    return t.index_select(0, torch.tensor(rows))


def _with_error_feedback(codec, memory, delta: torch.Tensor, seeds, clients) -> tuple[list[Payload], torch.Tensor]:
    """Steps 2-4 for one group: (payloads, z)."""
    stores = _stores(clients)
    residual: list[torch.Tensor | None] = [None] * len(clients)
    for store, rows in stores:  # 2. one block read per store
        for n, r in zip(rows, store.load_many([clients[n][2] for n in rows])):
            residual[n] = r
    has = [n for n, r in enumerate(residual) if r is not None]
    fresh = [n for n, r in enumerate(residual) if r is None]
    r_has = torch.stack([residual[n] for n in has]) if has else None
    if not fresh:  # every client holds a residual (the steady state)
        z = memory.compensate(delta, r_has)
    elif not has:  # z = Δ, as compensate(Δ, None) gives
        z = delta
    else:
        z = delta.clone()
        z[has] = memory.compensate(_rows(delta, has), r_has)
    payloads, z_hat = codec.roundtrip_batch(z, seeds)  # 3. encode; 4. r <- update(r, z, decode(p))
    if not fresh:
        r_new = memory.update(r_has, z, z_hat)
    elif not has:
        r_new = memory.update(None, z, z_hat)
    else:
        r_new = torch.empty_like(z)
        r_new[has] = memory.update(r_has, _rows(z, has), _rows(z_hat, has))
        r_new[fresh] = memory.update(None, _rows(z, fresh), _rows(z_hat, fresh))
    for store, rows in stores:  # one block write per store, once every payload is made
        store.save_many([clients[n][2] for n in rows], _rows(r_new, rows))
    return payloads, z
