"""Client side of the sparse broadcast (fl_sim.strategies.broadcast): keep the last model, rebuild from changes.

A train message whose config carries ``keys.MODEL_VERSION`` v is versioned: the node stores the model it
received (the full ArrayRecord) with v in its ``context.state`` and says so in its reply
(``keys.MODEL_HELD``). A message that carries ``keys.SPARSE_MODEL`` instead of the model, with base
version b, is rebuilt from the stored copy:

    w_v = w_b;   w_v[name].flat[idx] = val   for every array name     (bitwise the dense w_v)

If the node already holds v (another virtual client's message of the same round rebuilt it), that copy is
used. A node holding neither b nor v raises a one-line error (the reply becomes an error reply): the
server's list of holders and the node disagree, which must not silently train from a wrong model.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from fl_sim.wire import keys
from fl_sim.wire.records import ndarray_to_array

IDX, VAL = keys.SPARSE_IDX, keys.SPARSE_VAL

__all__ = ["receive_model", "hold_model", "rebuild"]

_STATE_MODEL = "fl-sim.broadcast.model"  # context.state: the last model received (ArrayRecord)
_STATE_VERSION = "fl-sim.broadcast.version"  # context.state: ConfigRecord {MODEL_VERSION: v}


def rebuild(base: ArrayRecord, sparse: ArrayRecord) -> ArrayRecord:
    """w = ``base`` with, per array, the entries at ``<name>.idx`` set to ``<name>.val`` (checked)."""
    expected = {n + s for n in base.keys() for s in (IDX, VAL)}
    if set(sparse.keys()) != expected:
        raise ValueError(f"sparse model: arrays {sorted(sparse.keys())[:4]}... do not match the held model's "
                         f"{len(base.keys())} arrays")
    out = {}
    for name in base.keys():
        w = base[name].numpy().copy()
        idx, val = sparse[name + IDX].numpy(), sparse[name + VAL].numpy()
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or val.shape != idx.shape or val.dtype != w.dtype:
            raise ValueError(f"sparse model: {name!r} needs 1-D integer indices and values of dtype {w.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= w.size):
            raise ValueError(f"sparse model: {name!r} has indices outside 0..{w.size - 1}")
        w.reshape(-1)[idx] = val
        out[name] = ndarray_to_array(w)
    return ArrayRecord(out)


def _versioned(message: Message) -> tuple[ConfigRecord, str] | None:
    """(config, arrays key) of a versioned train message, else None."""
    for value in message.content.values():
        if isinstance(value, ConfigRecord) and keys.MODEL_VERSION in value:
            return value, str(value.get(keys.ARRAYRECORD_KEY, keys.ARRAYS))
    return None


def _held(context: Context) -> int | None:
    rec = context.state.get(_STATE_VERSION)
    return int(rec[keys.MODEL_VERSION]) if isinstance(rec, ConfigRecord) else None


def receive_model(message: Message, context: Context) -> int | None:
    """Rebuild a sparse message's model in place and store a versioned model; returns its version (None:
    the message is not versioned, nothing stored)."""
    found = _versioned(message)
    if found is None:
        return None
    config, key = found
    version = int(config[keys.MODEL_VERSION])
    sparse = message.content.get(keys.SPARSE_MODEL)
    if isinstance(sparse, ArrayRecord):
        held = _held(context)
        base = int(config.get(keys.MODEL_BASE, -1))
        if held == version:
            model = context.state[_STATE_MODEL]
        elif held == base:
            model = rebuild(context.state[_STATE_MODEL], sparse)
        else:
            raise ValueError(f"sparse model broadcast: changes against version {base}, but this node holds "
                             f"{'no model' if held is None else f'version {held}'}; the server must send it the "
                             "full model")
        del message.content[keys.SPARSE_MODEL]
        message.content[key] = model
    elif not isinstance(message.content.get(key), ArrayRecord):
        return None
    if _held(context) != version:
        context.state[_STATE_MODEL] = message.content[key]
        context.state[_STATE_VERSION] = ConfigRecord({keys.MODEL_VERSION: version})
    return version


def hold_model(reply: Message, version: int | None) -> Message:
    """Tell the server (in the reply) which model version this node now holds."""
    if version is not None and not reply.has_error():
        reply.content[keys.MODEL_HELD] = ConfigRecord({keys.MODEL_VERSION: int(version)})
    return reply
