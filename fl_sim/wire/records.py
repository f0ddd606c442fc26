"""Conversions between Flower records and tensors: the only place that touches ArrayRecord layout.

* model <-> flat vector: the update Δ is the concatenation of every floating-point array of the
  model's ArrayRecord, in record order (integer buffers such as BatchNorm's ``num_batches_tracked``
  are not part of Δ and keep the server's value);
* :class:`~fl_sim.compression.Payload` <-> (ArrayRecord, ConfigRecord) for the wire: the ArrayRecord
  holds the codec's packed arrays (:meth:`~fl_sim.compression.Codec.wire_arrays`: signs 8 per byte,
  levels at ceil(log2 n) bits, coded indices, QSGD's Elias stream), and the receiver counts the uplink
  from the bytes that arrived (:func:`read_payload`), never from a declared count.

Arrays that come from clients are read with :func:`read_array`, which checks the npy header's declared
size against the bytes that actually arrived before NumPy allocates anything: ``Array.numpy()`` would
allocate whatever the header declares (a header saying 2^40 values asks for terabytes) before noticing
the data is short.
"""

from __future__ import annotations

import functools
import io
import json
import math

import numpy as np
import torch
from numpy.lib import format as npy_format
from flwr.app import Array, ArrayRecord, ConfigRecord

from fl_sim.wire import keys
from fl_sim.compression import Codec, Payload, PayloadError
from fl_sim.compression.packing import wire_bits

__all__ = [
    "read_array",
    "flatten_arrays",
    "float_sizes",
    "unflatten_into",
    "array_bits",
    "payload_to_records",
    "payload_from_records",
    "summed_payload_to_records",
    "summed_payload_from_records",
    "read_payload",
    "state_dict_to_arrays",
    "array_record",
    "flatten_with_bits",
    "model_spec",
    "flatten_checked",
    "ParsedArray",
    "ndarray_to_array",
]


@functools.lru_cache(maxsize=512)
def _expected_header(dtype: str, shape: tuple) -> tuple[np.dtype, bytes, int] | None:
    """(dtype, the npy header numpy writes for it (:func:`_npy_header`), element count) of a record entry's
    declared dtype and shape; None when they are not a plain dtype and shape. Cached: a model has a handful."""
    try:
        dt = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None
    if dt.hasobject or dt.itemsize == 0 or dt.fields is not None:
        return None
    return dt, _npy_header(dt, shape)[1], int(np.prod(shape, dtype=np.int64))


def _fast_view(arr: Array) -> np.ndarray | None:
    """The array of a record entry viewed in place (read-only), or None when the fast path does not apply.

    Applies to a plain ``.npy`` buffer that starts with exactly the header numpy writes for the entry's own
    dtype and shape (version 1.0, little-endian, C order: what ``np.save`` and :func:`ndarray_to_array`
    write) and whose payload has exactly that many bytes: then ``np.frombuffer`` gives the same array as
    Flower's ``Array.numpy`` (``np.load``, which parses the header with ``ast.literal_eval``: 75 us an
    array, the largest cost of reading a small model's reply). Any other buffer takes the checked slow path.
    """
    data = arr.data
    if arr.stype == "numpy.ndarray" and isinstance(data, bytes):
        try:
            expected = _expected_header(arr.dtype, tuple(arr.shape))
        except TypeError:  # an unhashable shape: not a plain entry
            return None
        if expected is None:
            return None
        dt, head, count = expected
        if data.startswith(head) and len(data) - len(head) == count * dt.itemsize:
            return np.frombuffer(data, dtype=dt, count=count, offset=len(head)).reshape(arr.shape)
    return None


_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def read_array(arr: Array, name: str = "array") -> np.ndarray:
    """``arr.numpy()`` for an array a client sent, refusing (PayloadError) what cannot be a plain array.

    Checked before anything is allocated: the serialization type, the npy magic and header, a plain
    (non-object) dtype, and that the header's shape x itemsize equals the data bytes present.
    """
    if getattr(arr, "stype", None) != "numpy.ndarray":
        raise PayloadError(f"array {name!r} has serialization type {getattr(arr, 'stype', None)!r}, not numpy.ndarray")
    data = arr.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"array {name!r} carries no bytes")
    view = _fast_view(arr)  # header exactly numpy's for the entry's dtype and shape, byte count checked
    if view is not None:
        return view
    f = io.BytesIO(data)
    try:
        version = npy_format.read_magic(f)
        shape, fortran, dtype = _HEADER_READERS[version](f)
    except (KeyError, ValueError, TypeError, EOFError, SyntaxError) as exc:
        raise PayloadError(f"array {name!r} is not a valid npy array ({exc})") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise PayloadError(f"array {name!r} has dtype {dtype}, not a plain numeric dtype")
    declared = math.prod(int(s) for s in shape) * dtype.itemsize
    present = len(data) - f.tell()
    if declared != present:
        raise PayloadError(
            f"array {name!r} declares shape {tuple(shape)} {dtype} ({declared} bytes) but carries {present} bytes"
        )
    return np.load(io.BytesIO(data), allow_pickle=False)


def _float_items(arrays: ArrayRecord):
    for name, arr in arrays.items():
        nd = read_array(arr, name)
        if np.issubdtype(nd.dtype, np.floating):
            yield name, nd


def flatten_arrays(arrays: ArrayRecord) -> torch.Tensor:
    """All floating-point arrays of a record, flattened and concatenated (float32, a copy)."""
    return flatten_with_bits(arrays)[0]


def flatten_with_bits(arrays: ArrayRecord) -> tuple[torch.Tensor, int]:
    """(:func:`flatten_arrays`, :func:`array_bits`) of a reply's record, every array read (and checked) once."""
    parts, bits = [], 0
    for name, arr in arrays.items():
        nd = read_array(arr, name)
        bits += nd.size * nd.dtype.itemsize * 8
        if np.issubdtype(nd.dtype, np.floating):
            parts.append(nd.reshape(-1).astype(np.float32, copy=False))
    return (torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)), int(bits)


def model_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype name) of every array of a model record, in record order (its entries' own
    fields: nothing is read). What a full-model reply must hold (:func:`flatten_checked`)."""
    return {name: (tuple(int(s) for s in arr.shape), str(arr.dtype)) for name, arr in arrays.items()}


def flatten_checked(arrays: ArrayRecord, spec: dict[str, tuple[tuple[int, ...], str]]) -> tuple[torch.Tensor, int]:
    """:func:`flatten_with_bits` of a full-model reply that must hold exactly the arrays of ``spec``
    (:func:`model_spec` of the global model): the same names, and for each the same shape and dtype as
    read from its bytes; an array missing, added (of any dtype) or of another shape or dtype raises
    PayloadError. Flattened in ``spec``'s order, so a reply listing its arrays in another order reads the
    same. Bits: those of the arrays checked (numel x dtype width)."""
    names = list(arrays.keys())
    extra = [n for n in names if n not in spec]
    if extra:
        raise PayloadError(f"model has arrays the global model lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    missing = [n for n in spec if n not in arrays]
    if missing:
        raise PayloadError(f"model lacks the arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    parts, bits = [], 0
    for name, (shape, dtype) in spec.items():
        nd = read_array(arrays[name], name)
        if nd.shape != shape or str(nd.dtype) != dtype:
            raise PayloadError(f"array {name!r} is {nd.dtype}{list(nd.shape)}, the global model's is {dtype}{list(shape)}")
        bits += nd.size * nd.dtype.itemsize * 8
        if np.issubdtype(nd.dtype, np.floating):
            parts.append(nd.reshape(-1).astype(np.float32, copy=False))
    return (torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)), int(bits)


def float_sizes(arrays: ArrayRecord) -> list[int]:
    """Sizes of the floating-point arrays in flatten order: the tensor segments of the flat update."""
    return [int(nd.size) for _, nd in _float_items(arrays)]


class ParsedArray(Array):
    """A server-side :class:`~flwr.app.Array` that keeps the array it was made from, so ``numpy()`` is a copy
    of it instead of ``np.load`` of the bytes (header parse included). Same ``data`` bytes, dtype, shape and
    values as ``Array(nd)``: only reading it is cheaper.

    Used for the model the wrapper hands its inner strategy once per reply (:func:`unflatten_into` with
    ``parsed=True``): Flower's FedAvg reads every reply's every array (``aggregate_arrayrecords``), and K
    replies share one model, so a round read it K times through ``np.load``. Never sent over the wire.
    """

    def __init__(self, nd: np.ndarray) -> None:
        own = np.array(nd, copy=True, order="C")
        own.flags.writeable = False
        wire = ndarray_to_array(own)
        super().__init__(dtype=wire.dtype, shape=wire.shape, stype=wire.stype, data=wire.data)
        self.__dict__["_parsed"] = own

    def numpy(self) -> np.ndarray:
        parsed = self.__dict__.get("_parsed")
        return super().numpy() if parsed is None else parsed.copy()  # a fresh writable array, as Array's

    def __setattr__(self, name: str, value) -> None:
        if name in ("dtype", "shape", "stype", "data"):
            self.__dict__.pop("_parsed", None)  # fields replaced: read the bytes again from now on
        super().__setattr__(name, value)


def unflatten_into(template: ArrayRecord, vector: torch.Tensor, *, parsed: bool = False) -> ArrayRecord:
    """A new ArrayRecord shaped like ``template`` whose float arrays come from ``vector``
    (``parsed``: as :class:`ParsedArray`, for records read in this process only)."""
    out: dict[str, Array] = {}
    offset = 0
    v = vector.detach().to(torch.float32).cpu().numpy()
    make = ParsedArray if parsed else Array
    for name, arr in template.items():
        nd = arr.numpy()
        if np.issubdtype(nd.dtype, np.floating):
            n = nd.size
            out[name] = make(v[offset : offset + n].reshape(nd.shape).astype(nd.dtype, copy=False))
            offset += n
        else:
            out[name] = make(nd.copy())
    if offset != v.size:
        raise ValueError(f"vector has {v.size} values but the model has {offset} floating-point parameters")
    return array_record(out)


def array_bits(arrays: ArrayRecord) -> int:
    """Bits of a record's array data as sent: numel x dtype width, summed (float32 -> 32 per value, a packed
    uint8 array 8 per byte); npy headers and names not included."""
    total = 0
    for name, arr in arrays.items():
        nd = read_array(arr, name)
        total += nd.size * nd.dtype.itemsize * 8
    return int(total)


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """(``str(dtype)`` as Flower records it, the npy header ``np.save`` writes) of a (dtype, shape): both
    cost more than the copy of a small array (``str(dtype)`` alone 17 us), and a model has a handful."""
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return str(dtype), buf.getvalue()


def ndarray_to_array(nd: np.ndarray) -> Array:
    """``Array(nd)`` with the same bytes (an ``.npy`` buffer, as ``np.save`` writes it), 4x faster: the dtype
    name and header of each (dtype, shape) are built once, and Flower's ``np.save`` call is skipped."""
    if nd.ndim == 0 or not nd.flags.c_contiguous or nd.dtype.hasobject or nd.dtype.fields is not None:
        return Array(nd)  # Flower's own conversion
    shape = nd.shape  # a tuple of Python ints
    name, header = _npy_header(nd.dtype, shape)
    return Array(dtype=name, shape=shape, stype="numpy.ndarray", data=b"".join((header, nd.reshape(-1).view(np.uint8))))


def array_record(arrays) -> ArrayRecord:
    """``ArrayRecord`` of (name, Array) pairs holding the given Array objects: ``ArrayRecord(dict)`` rebuilds
    every Array from its fields (Flower's ``from_array_dict``), a second validation of each array for
    nothing when the Arrays were just made (and it would turn a :class:`ParsedArray` into a plain one)."""
    record = ArrayRecord()
    for name, arr in (arrays.items() if isinstance(arrays, dict) else arrays):
        record[name] = arr
    return record


def state_dict_to_arrays(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    """ArrayRecord of a torch state dict (detached CPU copies)."""
    return array_record((k, ndarray_to_array(v.detach().cpu().numpy())) for k, v in state_dict.items())


def payload_to_records(payload: Payload, codec: Codec) -> tuple[ArrayRecord, ConfigRecord]:
    """(ArrayRecord of the payload's packed arrays (``codec.wire_arrays``), ConfigRecord with codec, dim,
    the codec's exact bit count and meta)."""
    arrays = array_record((k, ndarray_to_array(np.ascontiguousarray(a))) for k, a in codec.wire_arrays(payload).items())
    return arrays, _meta_record(payload, payload.meta)


def _meta_record(payload: Payload, extra: dict) -> ConfigRecord:
    """The payload's ConfigRecord: codec, dim, the codec's exact bit count (the sender's claim) and meta."""
    return ConfigRecord({keys.P_CODEC: payload.codec, keys.P_DIM: int(payload.dim), keys.P_BITS: int(payload.bits),
                         keys.P_META: json.dumps(extra)})


def _read_meta(meta: ConfigRecord) -> tuple[str, int, int, dict]:
    """(codec, dim, claimed bits, meta) of a payload's ConfigRecord; PayloadError when malformed."""
    try:
        return (str(meta[keys.P_CODEC]), int(meta[keys.P_DIM]), int(meta[keys.P_BITS]),
                json.loads(str(meta.get(keys.P_META, "{}"))))
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"payload meta record is malformed ({exc})") from None


def summed_payload_to_records(payload: Payload) -> tuple[ArrayRecord, ConfigRecord]:
    """Records of a payload sent as its tensors themselves, unpacked: a codec's already-summed form (the
    dequantized one-client aggregate a client masks under secure aggregation), which is float data, not
    the codec's packed codes. The meta says ``summed``; :func:`summed_payload_from_records` reads it."""
    arrays = array_record((k, ndarray_to_array(np.ascontiguousarray(t.detach().cpu().numpy())))
                          for k, t in payload.tensors.items())
    return arrays, _meta_record(payload, {**payload.meta, "summed": True})


def summed_payload_from_records(arrays: ArrayRecord, meta: ConfigRecord) -> Payload:
    """The Payload of :func:`summed_payload_to_records` (finite float tensors; PayloadError otherwise)."""
    name, dim, bits, extra = _read_meta(meta)
    tensors = {}
    for k, a in arrays.items():
        x = read_array(a, k)
        if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
            raise PayloadError(f"summed payload array {k!r}: finite floats expected, got {x.dtype}")
        tensors[k] = torch.from_numpy(np.array(x))
    extra.pop("summed", None)
    return Payload(codec=name, dim=dim, tensors=tensors, bits=bits, meta=extra)


def payload_from_records(arrays: ArrayRecord, meta: ConfigRecord, codec: Codec) -> Payload:
    """Rebuild a Payload from a reply (unpacked by ``codec``); raises PayloadError for a malformed one."""
    return read_payload(arrays, meta, codec)[0]


def read_payload(arrays: ArrayRecord, meta: ConfigRecord, codec: Codec) -> tuple[Payload, int]:
    """(the Payload of a reply, its wire bits): the arrays read (:func:`read_array`) and unpacked by
    ``codec.from_wire`` (strict: names, byte lengths, padding, code ranges; PayloadError otherwise).

    Wire bits = 8 x the data bytes of the received arrays (npy headers, names and Flower's message
    framing excluded: docs/performance.md measures those): the server's uplink count. The meta's
    ``bits`` is the sender's claim of the codec's exact count, kept on the Payload for the codec's
    own consistency check, never counted.
    """
    name, dim, bits, extra = _read_meta(meta)
    received = {k: read_array(a, k) for k, a in arrays.items()}
    if name != codec.name or dim != codec.dim:
        raise PayloadError(f"payload of codec {name!r} dim {dim}; the server expects {codec.name!r} dim {codec.dim}")
    tensors = codec.from_wire(received)
    return Payload(codec=name, dim=dim, tensors=tensors, bits=bits, meta=extra), wire_bits(received.values())
