"""Baseline codecs: identity, fp16, topk, randk, qsgd, sign, terngrad.

Sources (kernels and bit formulas in :mod:`fl_sim.compression.quantizers`):
  * QSGD: Alistarh et al. 2017 (thesis ref. [15]; Lemma 3.1 variance bound; NOTES §3.3 Lemma 19).
  * TernGrad: Wen et al. 2017.  Scaled sign: Karimireddy et al. 2019 (signSGD with scale, used with EF).
  * Top-k: Stich et al. 2018 (sparsified SGD with memory); random-k: Wangni et al. 2018 (thesis ref. [25]).

Every payload's ``bits`` is the exact fixed-length count documented on each class; float scalars and
values are float32 (32 bits), indices ceil(log2 d) bits. Randomness (QSGD / TernGrad rounding, random-k
indices) is drawn from ``torch_generator(seed, codec name)``, so decode rebuilds what it needs.
"""

from __future__ import annotations

import torch

from ...rng import torch_generator
from ..base import Codec, CodecError, Payload, PayloadError, register_codec
from ..base import check_seed as _check_seed  # one seed check for every codec
from ..quantizers import (
    FLOAT_BITS,
    level_dtype,
    qsgd_bits,
    qsgd_dequantize,
    qsgd_quantize,
    qsgd_variance_bound,
    randk_bits,
    randk_indices,
    scaled_sign,
    scaled_sign_decode,
    scatter_dense,
    sign_bits,
    terngrad_bits,
    terngrad_dequantize,
    terngrad_quantize,
    to_wire_float,
    topk_bits,
    topk_sparsify,
)

__all__ = ["IdentityCodec", "FP16Codec", "TopKCodec", "RandKCodec", "QSGDCodec", "SignCodec", "TernGradCodec"]

_F16_MAX = float(torch.finfo(torch.float16).max)




def _check_count(value: object, name: str, who: str, upper: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise CodecError(f"{who}: {name} must be an int in 1..{upper}, got {value!r}; {hint}")
    return value


def _check_finite(payload: Payload, who: str) -> None:
    for key, t in payload.tensors.items():
        if torch.is_floating_point(t) and not torch.isfinite(t).all():
            raise PayloadError(f"{who}: tensor {key!r} contains NaN or inf")


def _scalar(t: torch.Tensor) -> torch.Tensor:
    """A (1,) float32 wire scalar from a 0-d float64 tensor."""
    return t.reshape(1)


@register_codec
class IdentityCodec(Codec):
    """No compression: x sent as float32. bits = 32 d."""

    name = "identity"

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"x": ((self.dim,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = to_wire_float(self.check_input(x), "identity.encode", "a value")
        return Payload(self.name, self.dim, {"x": x.clone()}, FLOAT_BITS * self.dim)

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        return payload.tensors["x"].clone()

    def check_values(self, payload: Payload) -> None:
        """Every finite float32 vector is a valid payload: only NaN/inf are refused."""
        _check_finite(payload, "identity")


@register_codec
class FP16Codec(Codec):
    """x cast to IEEE half precision. bits = 16 d.

    |x_i| > 65504 cannot be represented and raises CodecError (scale the update or use ``identity``);
    magnitudes below 6e-8 round to zero.
    """

    name = "fp16"

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"x": ((self.dim,), torch.float16)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        peak = float(x.abs().max())
        if peak > _F16_MAX:
            raise CodecError(f"fp16.encode: |x| reaches {peak:.3g} > 65504, beyond float16; scale it or use 'identity'")
        return Payload(self.name, self.dim, {"x": x.to(torch.float16)}, 16 * self.dim)

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        return payload.tensors["x"].to(torch.float32)

    def check_values(self, payload: Payload) -> None:
        """Every finite float16 vector is a valid payload (|x_i| <= 65504 by construction): NaN/inf are refused."""
        _check_finite(payload, "fp16")


class _SparseCodec(Codec):
    """Shared parameter k for top-k / random-k."""

    def __init__(self, *, dim: int, k: int | None = None) -> None:
        super().__init__(dim=dim)
        if k is None:
            k = max(1, dim // 100)  # 1% of the coordinates
        self.k = _check_count(k, "k", self.name, dim, f"k must not exceed dim={dim}")

    def params(self) -> dict:
        return {"dim": self.dim, "k": self.k}


@register_codec
class TopKCodec(_SparseCodec):
    """Top-k: the k largest |x_i| with their indices (biased; pair with error feedback).

    bits = k (32 + ceil(log2 d)). Default k = max(1, d // 100).
    """

    name = "topk"

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"indices": ((self.k,), torch.int64), "values": ((self.k,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        idx, vals = topk_sparsify(x, self.k)
        vals = to_wire_float(vals, "topk.encode", "a value")
        return Payload(self.name, self.dim, {"indices": idx, "values": vals}, topk_bits(self.dim, self.k))

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        idx = payload.tensors["indices"]
        if int(idx.min()) < 0 or int(idx.max()) >= self.dim:
            raise PayloadError(f"topk.decode: indices outside 0..{self.dim - 1}")
        if torch.unique(idx).numel() != self.k:
            raise PayloadError("topk.decode: repeated indices")
        return scatter_dense(idx, payload.tensors["values"], self.dim)


@register_codec
class RandKCodec(_SparseCodec):
    """Random-k: k coordinates drawn uniformly without replacement from the seed (indices not sent).

    x_hat = c * (x on the k indices), c = d/k when ``unbiased`` (E[x_hat] = x,
    E||x_hat - x||^2 = (d/k - 1)||x||^2), else c = 1. bits = 32 k.
    """

    name = "randk"

    def __init__(self, *, dim: int, k: int | None = None, unbiased: bool = False) -> None:
        super().__init__(dim=dim, k=k)
        if not isinstance(unbiased, bool):
            raise CodecError(f"randk: unbiased must be true or false, got {unbiased!r}")
        self.unbiased = unbiased

    def params(self) -> dict:
        return {**super().params(), "unbiased": self.unbiased}

    def _indices(self, seed: int) -> torch.Tensor:
        return randk_indices(self.dim, self.k, generator=torch_generator(seed, "randk", "indices"))

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"values": ((self.k,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        vals = to_wire_float(x[self._indices(_check_seed(seed, "randk.encode"))], "randk.encode", "a value")
        return Payload(self.name, self.dim, {"values": vals}, randk_bits(self.k))

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        out = scatter_dense(self._indices(_check_seed(seed, "randk.decode")), payload.tensors["values"], self.dim)
        if not self.unbiased:
            return out
        return to_wire_float(out.to(torch.float64) * (self.dim / self.k), "randk.decode", "(d/k) x_i")


@register_codec
class QSGDCodec(Codec):
    """QSGD with s = ``levels`` (Alistarh et al.): x_hat_i = ||x||_2 sign(x_i) l_i / s.

    l_i = floor(s|x_i|/||x||_2) + Bernoulli(frac) in {0..s}: unbiased, and
    E||x_hat - x||^2 <= min(d/s^2, sqrt(d)/s) ||x||^2 (Lemma 3.1, :attr:`variance_bound`).
    bits = 32 + d (1 + ceil(log2(s + 1))), fixed-length sign + level (Elias coding not used).
    """

    name = "qsgd"

    def __init__(self, *, dim: int, levels: int = 4) -> None:
        super().__init__(dim=dim)
        self.levels = _check_count(levels, "levels", "qsgd", 2**20, "s quantization levels, e.g. 4")

    def params(self) -> dict:
        return {"dim": self.dim, "levels": self.levels}

    @property
    def variance_bound(self) -> float:
        return qsgd_variance_bound(self.dim, self.levels)

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"norm": ((1,), torch.float32), "q": ((self.dim,), level_dtype(self.levels))}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        norm, q = qsgd_quantize(x, self.levels, generator=torch_generator(_check_seed(seed, "qsgd.encode"), "qsgd"))
        norm = to_wire_float(_scalar(norm), "qsgd.encode", "||x||_2")
        return Payload(self.name, self.dim, {"norm": norm, "q": q}, qsgd_bits(self.dim, self.levels))

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        norm, q = payload.tensors["norm"], payload.tensors["q"]
        if float(norm[0]) < 0 or int(q.abs().max()) > self.levels:
            raise PayloadError(f"qsgd.decode: negative norm or levels outside {{-{self.levels}..{self.levels}}}")
        return qsgd_dequantize(norm[0], q, self.levels)


@register_codec
class SignCodec(Codec):
    """Scaled sign (Karimireddy et al. 2019): x_hat = (||x||_1 / d) sign(x), sign(0) = +1.

    Biased (use error feedback). bits = 32 + d.
    """

    name = "sign"

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"scale": ((1,), torch.float32), "signs": ((self.dim,), torch.int8)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        scale, signs = scaled_sign(x)
        scale = to_wire_float(_scalar(scale), "sign.encode", "||x||_1 / d")
        return Payload(self.name, self.dim, {"scale": scale, "signs": signs}, sign_bits(self.dim))

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        scale, signs = payload.tensors["scale"], payload.tensors["signs"]
        if float(scale[0]) < 0 or not bool((signs.abs() == 1).all()):
            raise PayloadError("sign.decode: scale must be >= 0 and signs +-1")
        return scaled_sign_decode(scale[0], signs)


@register_codec
class TernGradCodec(Codec):
    """TernGrad (Wen et al. 2017): x_hat_i = s sign(x_i) b_i, s = ||x||_inf, b_i ~ Bernoulli(|x_i|/s).

    Unbiased; E||x_hat - x||^2 = sum_i (s|x_i| - x_i^2). bits = 32 + 2d.
    """

    name = "terngrad"

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"scale": ((1,), torch.float32), "q": ((self.dim,), torch.int8)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        s, q = terngrad_quantize(x, generator=torch_generator(_check_seed(seed, "terngrad.encode"), "terngrad"))
        s = to_wire_float(_scalar(s), "terngrad.encode", "||x||_inf")
        return Payload(self.name, self.dim, {"scale": s, "q": q}, terngrad_bits(self.dim))

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        s, q = payload.tensors["scale"], payload.tensors["q"]
        if float(s[0]) < 0 or int(q.abs().max()) > 1:
            raise PayloadError("terngrad.decode: scale must be >= 0 and levels in {-1, 0, 1}")
        return terngrad_dequantize(s[0], q)
