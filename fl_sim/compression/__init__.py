"""fl_sim.compression: transforms, quantizers, sketches, sparse recovery, codecs, error feedback.

Pure tensor math (torch, numpy, scipy); never imports flwr. Public API::

    from fl_sim.compression import fwht, make_codec, Payload
    codec = make_codec("qcs", dim=d, k=32, levels=2)
    p = codec.encode(x, seed=s); x_hat = codec.decode(p, seed=s); p.bits

Layer: kernels. May import ``fl_sim.rng``, torch, numpy, scipy; never Flower or any other fl_sim layer.
"""

from __future__ import annotations

import importlib
from typing import Any

from fl_sim.compression.base import (
    Codec,
    CodecError,
    DenseOperator,
    LinearOperator,
    Payload,
    PayloadError,
    Seeds,
    codec_names,
    make_codec,
    register_codec,
)

# Names defined in submodules, imported on first use (keeps `import fl_sim.compression` light).
_LAZY = {
    "fwht": ".transforms",
    "PartialHadamard": ".projections",
    "SubsampledOrthogonal": ".projections",
    "BlockwiseOperator": ".projections",
    "CountSketch": ".sketch",
    "fiht": ".recovery",
    "biht": ".recovery",
    "l1_recovery_lp": ".recovery",
    "ErrorFeedback": ".error_feedback",
    "WeightedErrorFeedback": ".error_feedback",
    "ServerErrorFeedback": ".error_feedback",
    "dataq_quantize": ".dataq",
    "dataq_dequantize": ".dataq",
    "gradcorrq": ".dataq",
}

__all__ = [
    "Codec",
    "CodecError",
    "DenseOperator",
    "LinearOperator",
    "Payload",
    "PayloadError",
    "Seeds",
    "codec_names",
    "make_codec",
    "register_codec",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fl_sim.compression' has no attribute {name!r}")
