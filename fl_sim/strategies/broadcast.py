"""Downlink: the bits of what the server broadcasts, and the sparse broadcast of a model change.

Counting. The downlink of a round is what its train messages carry: for every message, the values of
every Array in every ArrayRecord of its content (the model, any method arrays), numel x dtype width,
summed over the round's recipients (:func:`message_bits`). The npy header of each Array and Flower's
message framing are not counted, as on the uplink.

Sparse broadcast (``sparse_broadcast=True`` on any fl-sim strategy; off by default). When the server's
update is K-sparse (FetchSGD's top-k unsketch, FIHT-CS's K-sparse recovery), w_t differs from w_{t-1}
in few coordinates. A node that holds w_{t-1} then gets only

    S_t = {(i, w_t[i]) : w_t[i] != w_{t-1}[i] bitwise},   per array: indices (int32) and values (its dtype)

and rebuilds w_t = w_{t-1} with w[i] <- w_t[i] on S_t: bitwise the model a dense broadcast carries,
whatever rounding the aggregation did (the new values are sent, not the difference). Bits per array:
(32 + width) |S_t|, against width x numel dense; a message is sent sparse only when that is fewer bits.
CommEfficient ([Rothchild-2020]'s code) counts its downlink by the changed weights too, 4 bytes each
(values only: its clients' stale copies are simulated on the server).

Who holds w_{t-1}: a node counts as holding version t-1 only when its round t-1 reply said so (the
client's ``compression_mod`` stores the last model it received in the node's ``context.state`` and
reports the version in a ConfigRecord ``keys.MODEL_HELD`` of its reply). A node that did not take part
in round t-1, failed, or runs a ClientApp without the mod gets the dense model. Several virtual clients
on one node share the node's copy (the first message of the round rebuilds it; the others find it).
A resumed run broadcasts densely in its first round (the previous model is not checkpointed).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fl_sim.wire import keys
from fl_sim.wire.records import ndarray_to_array

__all__ = ["array_record_bits", "message_bits", "sparse_changes", "SparseBroadcast", "IDX", "VAL"]

IDX, VAL = keys.SPARSE_IDX, keys.SPARSE_VAL  # suffixes of an array's indices and values in the sparse record


def array_record_bits(record: ArrayRecord) -> int:
    """Σ numel x dtype width (bits) of the Arrays of ``record``, read from their shape and dtype."""
    return int(sum(8 * int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values()))


def message_bits(msg: Message) -> int:
    """Bits of the array values a message carries: every ArrayRecord of its content."""
    return sum(array_record_bits(v) for v in msg.content.values() if isinstance(v, ArrayRecord))


def _bits_view(a: np.ndarray) -> np.ndarray | None:
    """``a`` flattened and viewed as unsigned integers of its width (a bitwise comparison), or None."""
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.itemsize not in (1, 2, 4, 8):
        return None
    return np.ascontiguousarray(a).reshape(-1).view(f"u{a.dtype.itemsize}")


def sparse_changes(prev: ArrayRecord, new: ArrayRecord) -> ArrayRecord | None:
    """The sparse record S of ``new`` against ``prev`` (``<name>.idx`` int32/int64, ``<name>.val``), or None
    when the two records do not have the same arrays (names, shapes, dtypes) in the same order."""
    if list(prev.keys()) != list(new.keys()):
        return None
    out = {}
    for name in new.keys():
        a, b = new[name].numpy(), prev[name].numpy()
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
        va, vb = _bits_view(a), _bits_view(b)
        if va is None:
            return None
        idx = np.flatnonzero(va != vb)
        idx = idx.astype(np.int32 if a.size < 2**31 else np.int64)
        out[name + IDX] = ndarray_to_array(idx)
        out[name + VAL] = ndarray_to_array(np.ascontiguousarray(a.reshape(-1)[idx]))
    return ArrayRecord(out)


class SparseBroadcast:
    """Server side of the sparse broadcast: the last broadcast model, its version, and the nodes that hold it."""

    def __init__(self) -> None:
        self.prev: ArrayRecord | None = None
        self.version: int | None = None
        self.holders: set[int] = set()
        self.sparse_messages = 0

    def observe_replies(self, version: int, replies: list[Message]) -> None:
        """Nodes whose reply reports holding ``version`` (the model of this round)."""
        held = set()
        for msg in replies:
            if msg.has_error():
                continue
            rec = msg.content.get(keys.MODEL_HELD)
            if isinstance(rec, ConfigRecord) and rec.get(keys.MODEL_VERSION) == version:
                held.add(msg.metadata.src_node_id)
        if version == self.version:
            self.holders = held

    def apply(self, version: int, arrays: ArrayRecord, arrays_key: str, config_key: str,
              messages: list[Message]) -> list[Message]:
        """Version the round's messages that carry the global model ``arrays``; send the changes against the
        previous version to the nodes that hold it, where that is fewer bits. Returns the messages."""
        sparse = None
        if self.prev is not None and self.holders:
            sparse = sparse_changes(self.prev, arrays)
        dense_bits = array_record_bits(arrays)
        sparse_bits = array_record_bits(sparse) if sparse is not None else None
        self.sparse_messages = 0
        for msg in messages:
            content = msg.content
            if content.get(arrays_key) is not arrays or not isinstance(content.get(config_key), ConfigRecord):
                continue  # the method gave this message its own model (e.g. RLC's noisy downlink): dense
            content[config_key][keys.MODEL_VERSION] = int(version)
            if sparse is not None and sparse_bits < dense_bits and msg.metadata.dst_node_id in self.holders:
                del content[arrays_key]
                content[keys.SPARSE_MODEL] = sparse
                content[config_key][keys.MODEL_BASE] = int(self.version)
                self.sparse_messages += 1
        self.prev, self.version, self.holders = arrays, int(version), set()
        return messages
