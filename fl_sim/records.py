"""Conversions between Flower records and tensors: the only place that touches ArrayRecord layout.

* model <-> flat vector: the update Δ is the concatenation of every floating-point array of the
  model's ArrayRecord, in record order (integer buffers such as BatchNorm's ``num_batches_tracked``
  are not part of Δ and keep the server's value);
* :class:`~fl_sim.compression.Payload` <-> (ArrayRecord, ConfigRecord) for the wire.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from . import keys
from .compression import Payload, PayloadError

__all__ = [
    "flatten_arrays",
    "float_sizes",
    "unflatten_into",
    "array_bits",
    "payload_to_records",
    "payload_from_records",
    "state_dict_to_arrays",
]


def _float_items(arrays: ArrayRecord):
    for name, arr in arrays.items():
        nd = arr.numpy()
        if np.issubdtype(nd.dtype, np.floating):
            yield name, nd


def flatten_arrays(arrays: ArrayRecord) -> torch.Tensor:
    """All floating-point arrays of a record, flattened and concatenated (float32, a copy)."""
    parts = [torch.from_numpy(np.ascontiguousarray(nd, dtype=np.float32)).reshape(-1) for _, nd in _float_items(arrays)]
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def float_sizes(arrays: ArrayRecord) -> list[int]:
    """Sizes of the floating-point arrays in flatten order: the tensor segments of the flat update."""
    return [int(nd.size) for _, nd in _float_items(arrays)]


def unflatten_into(template: ArrayRecord, vector: torch.Tensor) -> ArrayRecord:
    """A new ArrayRecord shaped like ``template`` whose float arrays come from ``vector``."""
    out: dict[str, Array] = {}
    offset = 0
    v = vector.detach().to(torch.float32).cpu().numpy()
    for name, arr in template.items():
        nd = arr.numpy()
        if np.issubdtype(nd.dtype, np.floating):
            n = nd.size
            out[name] = Array(v[offset : offset + n].reshape(nd.shape).astype(nd.dtype, copy=False))
            offset += n
        else:
            out[name] = Array(nd.copy())
    if offset != v.size:
        raise ValueError(f"vector has {v.size} values but the model has {offset} floating-point parameters")
    return ArrayRecord(out)


def array_bits(arrays: ArrayRecord) -> int:
    """Bits of an uncompressed record as sent: numel x dtype width, summed (float32 -> 32 per value)."""
    return int(sum(arr.numpy().size * arr.numpy().dtype.itemsize * 8 for arr in arrays.values()))


def state_dict_to_arrays(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    """ArrayRecord of a torch state dict (detached CPU copies)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in state_dict.items()})


def payload_to_records(payload: Payload) -> tuple[ArrayRecord, ConfigRecord]:
    """(ArrayRecord of the payload's tensors, ConfigRecord with codec, dim, bits, meta)."""
    arrays = ArrayRecord({k: Array(t.detach().cpu().contiguous().numpy()) for k, t in payload.tensors.items()})
    meta = ConfigRecord(
        {
            keys.P_CODEC: payload.codec,
            keys.P_DIM: int(payload.dim),
            keys.P_BITS: int(payload.bits),
            keys.P_META: json.dumps(payload.meta),
        }
    )
    return arrays, meta


def payload_from_records(arrays: ArrayRecord, meta: ConfigRecord) -> Payload:
    """Rebuild a Payload from a reply; raises PayloadError for a malformed one."""
    try:
        codec = str(meta[keys.P_CODEC])
        dim = int(meta[keys.P_DIM])
        bits = int(meta[keys.P_BITS])
        extra = json.loads(str(meta.get(keys.P_META, "{}")))
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"payload meta record is malformed ({exc})") from None
    tensors = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in arrays.items()}
    return Payload(codec=codec, dim=dim, tensors=tensors, bits=bits, meta=extra)
