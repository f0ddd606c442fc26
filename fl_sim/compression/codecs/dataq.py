"""Codec ``dataq``: DataQ on a batch of data samples (Hanna et al., DaQuSGD).

Source: [Hanna-DaQuSGD] Algorithm 2 (DataQ), Theorem 1, Remark 1, §VI;
docs/notes.md#daqusgd. Kernels in :mod:`fl_sim.compression.dataq`.

Convention: the codec's vector is a batch of N samples of ``features`` = d values each, flattened
row-major: x = Z.reshape(-1) with Z of shape (N, d), dim = N d. The codec is deterministic (no seed use).
"""

from __future__ import annotations

import math

import torch

from fl_sim.compression.base import Codec, CodecError, Payload, PayloadError, register_codec
from fl_sim.compression.dataq import _split_floor, dataq_bits, norm_tolerance
from fl_sim.compression.quantizers import FLOAT_BITS, bits_for_index, level_dtype, to_wire_float

__all__ = ["DataQCodec"]


@register_codec
class DataQCodec(Codec):
    """DataQ of each sample, or the per-feature practical variant.

    mode "exact" (Algorithm 2 per sample Z, ||Z||_2 <= B):
        a = floor((m-1) Z+/B), b = floor((m-1) Z-/B),  Z_Q = (a - b) B/(m-1);
        (a, b) is sent as its index in S = {(w, v): ||w||_1 + ||v||_1 <= (m-1)^2}:
        bits = N ceil(log2 C(2d + (m-1)^2, 2d)) (Theorem 1; the payload carries a and b, the bits count
        the index). With ``bound=None`` each sample's ||Z||_2 is sent (32 bits) and Z/||Z||_2 is
        quantized with B = 1 (Remark 1): bits += 32 N. A sample with ||Z||_2 > B raises CodecError.
    mode "per_feature" (§VI): S = B, or the batch max |Z_ij| sent as one float32 when ``bound=None``;
        level_ij = floor((m-1) Z+_ij/S) - floor((m-1) Z-_ij/S) in {-(m-1)..m-1}, fixed-length code of
        ceil(log2(2m - 1)) bits per feature: bits = [32] + N d ceil(log2(2m - 1)). |Z_ij| > B raises.

    In both modes ||Z - Z_Q||_inf <= B/(m-1) (S/(m-1)).

    Args: dim: N d. levels: m >= 2 (levels on [0, B] per sign). bound: B > 0 or None (scale sent).
        mode: "exact" or "per_feature". features: d (default dim: one sample); must divide dim.
    """

    name = "dataq"

    def __init__(
        self,
        *,
        dim: int,
        levels: int = 8,
        bound: float | None = None,
        mode: str = "per_feature",
        features: int | None = None,
    ) -> None:
        super().__init__(dim=dim)
        if isinstance(levels, bool) or not isinstance(levels, int) or not 2 <= levels <= 2**15:
            raise CodecError(f"dataq: levels (m) must be an int in 2..32768, got {levels!r}")
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0
        ):
            raise CodecError(f"dataq: bound (B) must be a positive number or None (scale sent), got {bound!r}")
        if mode not in ("exact", "per_feature"):
            raise CodecError(f"dataq: mode must be 'exact' (Alg. 2 per sample) or 'per_feature' (§VI), got {mode!r}")
        features = dim if features is None else features
        if isinstance(features, bool) or not isinstance(features, int) or features < 1 or dim % features:
            raise CodecError(f"dataq: features (d per sample) must be a positive divisor of dim={dim}, got {features!r}")
        self.levels, self.bound, self.mode, self.features = levels, bound, mode, features
        self.samples = dim // features
        self._steps = levels - 1
        self._dtype = level_dtype(self._steps)

    def params(self) -> dict:
        return {"dim": self.dim, "levels": self.levels, "bound": self.bound, "mode": self.mode, "features": self.features}

    @property
    def bits_per_sample(self) -> int:
        """Index bits of one sample: ceil(log2|S|) (exact) or d ceil(log2(2m-1)) (per_feature)."""
        if self.mode == "exact":
            return dataq_bits(self.features, self.levels)
        return self.features * bits_for_index(2 * self.levels - 1)

    def _bits(self) -> int:
        header = 0 if self.bound is not None else (FLOAT_BITS * self.samples if self.mode == "exact" else FLOAT_BITS)
        return header + self.samples * self.bits_per_sample

    def _scales(self, z: torch.Tensor) -> torch.Tensor:
        """(N,) float64: B, ||Z_i||_2 (exact, bound None), or the batch max |Z| (per_feature, bound None)."""
        if self.bound is not None:
            return torch.full((self.samples,), float(self.bound), dtype=torch.float64)
        if self.mode == "exact":
            return torch.linalg.vector_norm(z.to(torch.float64), dim=1)
        return z.abs().max().to(torch.float64).expand(self.samples).clone()

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        z = x.view(self.samples, self.features)
        scales = self._scales(z)
        if self.bound is not None:
            size = (
                torch.linalg.vector_norm(z.to(torch.float64), dim=1)
                if self.mode == "exact"
                else z.abs().amax(dim=1).to(torch.float64)
            )
            if float(size.max()) > self.bound * (1 + (norm_tolerance(self.levels) if self.mode == "exact" else 0.0)):
                what = "||Z_i||_2" if self.mode == "exact" else "|Z_ij|"
                raise CodecError(
                    f"dataq.encode: {what} = {float(size.max()):.6g} exceeds bound B = {self.bound:.6g}; "
                    "raise the bound or use bound=None (scale sent)"
                )
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        a, b = _split_floor(z.to(torch.float64) / safe.unsqueeze(1), self._steps, 1.0)
        tensors = {"a": a.to(self._dtype), "b": b.to(self._dtype)}
        if self.bound is None:
            wire = scales if self.mode == "exact" else scales[:1]
            tensors["scale"] = to_wire_float(wire, "dataq.encode", "the scale")
        return Payload(self.name, self.dim, tensors, self._bits(), {"mode": self.mode, "levels": self.levels})

    def check_values(self, payload: Payload) -> None:
        """Raise PayloadError for a payload DataQ cannot have made (vectorized over all samples):

        wrong names / shapes / dtypes; a level outside 0..m-1; a and b both nonzero at one feature (Z+ and
        Z- are never both positive); exact mode: a sample with ||a||_1 + ||b||_1 > (m-1)^2 (outside S,
        Theorem 1 (i)); a scale that is negative or non-finite; a zero scale with nonzero levels.
        """
        shape = (self.samples, self.features)
        expected = {"a": (shape, self._dtype), "b": (shape, self._dtype)}
        if self.bound is None:
            expected["scale"] = (((self.samples,) if self.mode == "exact" else (1,)), torch.float32)
        self.check_payload(payload, expected)
        a, b = payload.tensors["a"].to(torch.int64), payload.tensors["b"].to(torch.int64)
        if bool(((a < 0) | (b < 0) | (a > self._steps) | (b > self._steps)).any()):
            raise PayloadError(f"dataq.decode: a and b must lie in 0..{self._steps}")
        if bool(((a > 0) & (b > 0)).any()):
            raise PayloadError("dataq.decode: a and b are both nonzero at one feature (Z+ and Z- cannot both be > 0)")
        if self.mode == "exact" and bool(((a + b).sum(dim=1) > self._steps**2).any()):
            raise PayloadError(f"dataq.decode: a sample's ||a||_1 + ||b||_1 exceeds (m-1)^2 = {self._steps**2} (not in S)")
        if self.bound is None:
            s = payload.tensors["scale"]
            if bool((s < 0).any()):
                raise PayloadError("dataq.decode: negative scale")
            zero = (s == 0).expand(self.samples)
            if bool((zero & ((a + b).sum(dim=1) > 0)).any()):
                raise PayloadError("dataq.decode: a sample with scale 0 has nonzero levels")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_values(payload)
        a, b = payload.tensors["a"].to(torch.int64), payload.tensors["b"].to(torch.int64)
        if self.bound is not None:
            scales = torch.full((self.samples,), float(self.bound), dtype=torch.float64)
        else:
            s = payload.tensors["scale"].to(torch.float64)
            scales = s if self.mode == "exact" else s.expand(self.samples)
        z = (a - b).to(torch.float64) * (scales / self._steps).unsqueeze(1)
        return to_wire_float(z.reshape(-1), "dataq.decode", "the reconstruction")
