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

import numpy as np
import torch

from fl_sim.compression.dataq import per_feature_levels
from fl_sim.compression.errors import PayloadError
from fl_sim.compression.packing import Field, Levels, Plain

__all__ = ["pack_samples", "unpack_samples"]

_MAX_SAMPLES = 2**31 - 1


def _fields(quantizer: str, bits_per_feature: int, levels: int, n: int, shape: tuple[int, ...], classes: int,
            gradcorrq: bool) -> dict[str, Field]:
    """How each array of a reply of ``n`` samples of ``shape`` travels (the module docstring's table)."""
    if quantizer == "per_feature":
        m = per_feature_levels(bits_per_feature)
        fields: dict[str, Field] = {"levels": Levels((n, *shape), torch.int64, -(m - 1), m - 1),
                                    "scale": Plain((1,), torch.float32)}
    else:
        fields = {name: Levels((n, *shape), torch.int64, 0, int(levels) - 1) for name in ("a", "b")}
        fields["norms"] = Plain((n,), torch.float32)
    fields["labels"] = Levels((n,), torch.int64, 0, int(classes) - 1)
    if gradcorrq and n:
        fields["gc_bits"] = Levels((n,), torch.int64, 0, 1)
    return fields


def pack_samples(arrays: dict[str, torch.Tensor], labels: torch.Tensor, *, quantizer: str, bits_per_feature: int,
                 levels: int, num_classes: int) -> dict[str, np.ndarray]:
    """The arrays a node sends for its selection (``arrays``: select_and_quantize's levels/scale or a/b/norms,
    and gc_bits), packed as the module docstring says."""
    n = int(labels.numel())
    shape = tuple(int(s) for s in arrays["levels" if quantizer == "per_feature" else "a"].shape[1:])
    fields = _fields(quantizer, bits_per_feature, levels, n, shape, num_classes, "gc_bits" in arrays)
    values = {**arrays, "labels": labels}
    return {"header": np.array([n, int(num_classes), *shape], dtype=np.int32),
            **{name: f.pack(values[name].reshape(f.shape).to(f.dtype)) for name, f in fields.items()}}


def unpack_samples(received: dict[str, np.ndarray], *, quantizer: str, bits_per_feature: int, levels: int,
                   gradcorrq: bool) -> dict[str, torch.Tensor]:
    """The node's tensors back (levels or a/b int64 of shape [n, *shape], scale or norms float32, labels
    int64, gc_bits int64, and ``classes``) from :func:`pack_samples`'s arrays, checked strictly (PayloadError)."""
    header = received.get("header")
    if header is None or header.dtype != np.int32 or header.ndim != 1 or header.size < 2:
        raise PayloadError("DaQuSGD reply: array 'header' must be int32 [n, classes, *sample shape]")
    n, classes, shape = int(header[0]), int(header[1]), tuple(int(s) for s in header[2:])
    if not 0 <= n <= _MAX_SAMPLES or classes < 1 or any(s < 1 for s in shape):
        raise PayloadError(f"DaQuSGD reply: header {header.tolist()} is not [n >= 0, classes >= 1, shape >= 1]")
    fields = _fields(quantizer, bits_per_feature, levels, n, shape, classes, gradcorrq)
    if set(received) != {"header", *fields}:
        raise PayloadError(f"DaQuSGD reply carries {sorted(received)}; expected {sorted({'header', *fields})}")
    return {**{name: f.unpack(received[name], name) for name, f in fields.items()}, "classes": torch.tensor(classes)}
