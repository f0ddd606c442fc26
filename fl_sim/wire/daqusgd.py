"""DaQuSGD's reply on the wire: the selected samples packed at the bits the method counts ([Hanna-DaQuSGD]).

A node sends quantized samples, not an update, so its reply does not go through a codec. The arrays are
packed here with :mod:`fl_sim.compression.packing`, and the server counts 8 x the bytes it receives:

* ``header``: int32 ``[n, C, *input_shape]`` (samples sent, label alphabet size, one sample's shape);
* per-feature DataQ: ``levels`` a - b in {-(m-1)..m-1}, m = 2^(b-1), as codes of b bits each
  (n d b bits); ``scale``: the batch's float32 scale;
* exact DataQ (Algorithm 2): ``a`` and ``b`` in {0..m-1}, ceil(log2 m) bits each per feature (the
  per-feature code, not Theorem 1's index into S: what is sent is what is counted), ``norms`` float32;
* ``labels``: ceil(log2 C) bits each; ``gc_bits`` (GradCorrQ): one bit per sample.

Each array is padded to whole bytes with zero bits; :func:`unpack_samples` checks byte lengths,
padding and code ranges (PayloadError naming the array).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fl_sim.compression.dataq import per_feature_levels
from fl_sim.compression.errors import PayloadError, bits_for_index
from fl_sim.compression.packing import pack_uint, unpack_uint

__all__ = ["pack_samples", "unpack_samples", "wire_bits"]

_MAX_SAMPLES = 2**31 - 1


def _alphabet(quantizer: str, bits_per_feature: int, levels: int) -> tuple[int, int]:
    """(lowest value, number of values) of one feature's code."""
    if quantizer == "per_feature":
        m = per_feature_levels(bits_per_feature)
        return -(m - 1), 2 * m - 1
    return 0, int(levels)


def pack_samples(arrays: dict[str, torch.Tensor], labels: torch.Tensor, *, quantizer: str, bits_per_feature: int,
                 levels: int, num_classes: int) -> dict[str, np.ndarray]:
    """The arrays a node sends for its selection (``arrays``: select_and_quantize's levels/scale or a/b/norms,
    and gc_bits), packed as the module docstring says."""
    n = int(labels.numel())
    feats = "levels" if quantizer == "per_feature" else "a"
    shape = tuple(int(s) for s in arrays[feats].shape[1:])
    lo, count = _alphabet(quantizer, bits_per_feature, levels)
    width = bits_for_index(count)
    out = {"header": np.array([n, int(num_classes), *shape], dtype=np.int32)}
    names = ("levels",) if quantizer == "per_feature" else ("a", "b")
    for name in names:
        out[name] = pack_uint(arrays[name].reshape(-1).numpy().astype(np.int64) - lo, width)
    for name in ("scale", "norms"):
        if name in arrays:
            out[name] = np.ascontiguousarray(arrays[name].reshape(-1).numpy(), dtype=np.float32)
    out["labels"] = pack_uint(labels.reshape(-1).numpy().astype(np.int64), bits_for_index(int(num_classes)))
    if "gc_bits" in arrays:
        out["gc_bits"] = pack_uint(arrays["gc_bits"].reshape(-1).numpy().astype(np.int64), 1)
    return out


def unpack_samples(received: dict[str, np.ndarray], *, quantizer: str, bits_per_feature: int, levels: int,
                   gradcorrq: bool) -> dict[str, torch.Tensor]:
    """The node's tensors back (levels or a/b int64 of shape [n, *shape], scale or norms float32, labels
    int64, gc_bits int64) from :func:`pack_samples`'s arrays, checked strictly (PayloadError)."""
    header = received.get("header")
    if header is None or header.dtype != np.int32 or header.ndim != 1 or header.size < 2:
        raise PayloadError("DaQuSGD reply: array 'header' must be int32 [n, classes, *sample shape]")
    n, classes, shape = int(header[0]), int(header[1]), tuple(int(s) for s in header[2:])
    if not 0 <= n <= _MAX_SAMPLES or classes < 1 or any(s < 1 for s in shape):
        raise PayloadError(f"DaQuSGD reply: header {header.tolist()} is not [n >= 0, classes >= 1, shape >= 1]")
    d = math.prod(shape)
    per_feature = quantizer == "per_feature"
    names = {"header", "labels"} | ({"levels", "scale"} if per_feature else {"a", "b", "norms"})
    names |= {"gc_bits"} if gradcorrq and n else set()
    if set(received) != names:
        raise PayloadError(f"DaQuSGD reply carries {sorted(received)}; expected {sorted(names)}")
    lo, count = _alphabet(quantizer, bits_per_feature, levels)
    width = bits_for_index(count)
    out: dict[str, torch.Tensor] = {}
    for name in ("levels",) if per_feature else ("a", "b"):
        codes = unpack_uint(received[name], width, n * d, name)
        if codes.size and int(codes.max()) >= count:
            raise PayloadError(f"array {name!r}: code {int(codes.max())} outside 0..{count - 1}")
        out[name] = torch.from_numpy(codes + lo).reshape(n, *shape)
    for name, size in (("scale", 1),) if per_feature else (("norms", n),):
        a = received[name]
        if a.dtype != np.float32 or a.shape != (size,):
            raise PayloadError(f"array {name!r} must be float32 of shape ({size},), got {a.dtype} {a.shape}")
        out[name] = torch.from_numpy(a.copy())
    labels = unpack_uint(received["labels"], bits_for_index(classes), n, "labels")
    if labels.size and int(labels.max()) >= classes:
        raise PayloadError(f"array 'labels': label {int(labels.max())} outside 0..{classes - 1}")
    out["labels"] = torch.from_numpy(labels)
    out["classes"] = torch.tensor(classes)
    if "gc_bits" in names:
        out["gc_bits"] = torch.from_numpy(unpack_uint(received["gc_bits"], 1, n, "gc_bits"))
    return out


def wire_bits(received: dict[str, np.ndarray]) -> int:
    """What the server counts: 8 x the data bytes of the arrays received."""
    return 8 * sum(int(a.nbytes) for a in received.values())
