"""Baseline codecs: identity, fp16, topk, randk, qsgd, sign, terngrad.

Sources (kernels and bit formulas in :mod:`fl_sim.compression.quantizers` and
:mod:`fl_sim.compression.coding`; the table of every codec's coding is docs/codecs.md):
  * QSGD: [Alistarh-2017] (Section 3.1 Q_s, Lemma 3.1 variance bound, Section 3.2 Elias Code_s;
    [Abdi-thesis] ref. [15]; App. A Lemma 19, docs/notes.md#qsgd-as-dither).
  * TernGrad: [Wen-2017] (stochastic ternarization, layer-wise scaling, gradient clipping at 2.5 sigma).
  * Scaled sign: [Karimireddy-2019] (signSGD with scale, used with EF).
  * Top-k: [Stich-2018] (sparsified SGD with memory); random-k: [Wangni-2018] (thesis ref. [25]).

Scale granularity (``granularity: tensor | vector`` with ``segments``, :mod:`fl_sim.compression.segments`):
with "tensor" each model tensor gets its own norm / scale / top-k share; ``segments`` (the tensor
sizes) are filled in by ``CompressedFedAvg`` from the global model; without them the vector is one
tensor. Every payload's ``bits`` is exact for what would be sent (one float32 per scale counted).
Randomness (QSGD / TernGrad rounding, random-k indices) is drawn from ``torch_generator(seed, codec
name)``, so decode rebuilds what it needs. ``check_values`` rejects values no well-formed payload holds.

Batched (``encode_batch`` / ``decode_batch``, a cohort's block (C, d) at once): top-k, QSGD, scaled sign
and TernGrad quantize the whole block with the kernels' tensor ops (segment sums per row as a lone
vector's: :class:`~fl_sim.compression.segments.RowSegments`); QSGD and TernGrad draw each client's
uniforms from its own generator, exactly the draws of ``encode``. Payloads are bitwise ``encode``'s.
Random-k keeps the default loop (its indices are each client's own draw; one gather per client is all
the work there is); identity and fp16 too (a copy or a cast).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.compression.base import Codec, CodecError, Payload, PayloadError, Seeds, check_seed, register_codec
from fl_sim.compression.coding import gap_stream_bits, qsgd_stream_bits
from fl_sim.compression.quantizers import (
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
    split_k,
    terngrad_bits,
    terngrad_dequantize,
    terngrad_quantize,
    to_wire_float,
    topk_bits,
    topk_rows,
    topk_segments,
)
from fl_sim.compression.segments import RowSegments, Segments, check_granularity, segments_for

__all__ = ["IdentityCodec", "FP16Codec", "TopKCodec", "RandKCodec", "QSGDCodec", "SignCodec", "TernGradCodec"]

_F16_MAX = float(torch.finfo(torch.float16).max)
CODINGS = ("elias", "fixed")



def _check_count(value: object, name: str, who: str, upper: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise CodecError(f"{who}: {name} must be an int in 1..{upper}, got {value!r}; {hint}")
    return value


def _check_choice(value: object, name: str, who: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise CodecError(f"{who}: {name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return str(value)


def _check_scales(t: torch.Tensor, who: str, what: str) -> None:
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise PayloadError(f"{who}: {what} must be finite and >= 0")


def _check_bits(payload: Payload, expected: int, who: str) -> None:
    """The payload's ``bits`` must be the exact count of its own coding (a client cannot misreport it)."""
    if payload.bits != expected:
        raise PayloadError(f"{who}: payload claims {payload.bits} bits, its coding takes {expected}")


def _stack(payloads: Sequence[Payload], key: str) -> torch.Tensor:
    return torch.stack([p.tensors[key] for p in payloads])


class _Granular(Codec):
    """``granularity`` / ``segments`` parameters and the Segments they give (one scale per segment)."""

    def _init_granularity(self, granularity: object, segments: object) -> None:
        self.granularity, self.segments = check_granularity(granularity, segments, self.dim, self.name)
        self.seg: Segments = segments_for(self.granularity, self.segments, self.dim)

    def _granularity_params(self) -> dict:
        return {"granularity": self.granularity, "segments": list(self.segments) if self.segments else None}

    def _zero_scale_levels(self, scales: torch.Tensor, q: torch.Tensor, what: str) -> None:
        """A segment whose scale is 0 was all zeros: its levels must be 0."""
        if bool((scales == 0).any()) and bool(((self.seg.sum(q.abs().to(torch.int64)) > 0) & (scales == 0)).any()):
            raise PayloadError(f"{self.name}.decode: nonzero levels in a segment whose {what} is 0")


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

    def check_values(self, payload: Payload) -> None:
        if not bool(torch.isfinite(payload.tensors["x"]).all()):
            raise PayloadError(f"{self.name}.decode: values must be finite")
        _check_bits(payload, FLOAT_BITS * self.dim, "identity.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return payload.tensors["x"].clone()


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

    def check_values(self, payload: Payload) -> None:
        if not bool(torch.isfinite(payload.tensors["x"]).all()):
            raise PayloadError(f"{self.name}.decode: values must be finite")
        _check_bits(payload, 16 * self.dim, "fp16.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return payload.tensors["x"].to(torch.float32)


def _check_k(k: object, dim: int, who: str) -> int:
    if k is None:
        k = max(1, dim // 100)  # 1% of the coordinates
    return _check_count(k, "k", who, dim, f"k must not exceed dim={dim}")


@register_codec
class TopKCodec(_Granular):
    """Top-k ([Stich-2018]): the k largest |x_i| with their indices (biased; pair with error feedback).

    Args:
        k: coordinates sent (default max(1, d // 100)).
        granularity: "vector" (default: the paper's top-k over the whole vector) or "tensor": each tensor
            keeps its own top-k_t, k_t apportioned to the tensor sizes with exact total k
            (:func:`~fl_sim.compression.quantizers.split_k`; GRACE uses max(1, floor(ratio n_t)) instead).
        segments: the tensor sizes (filled in by CompressedFedAvg).
        index_coding: "fixed" (default; ceil(log2 d) bits per index) or "elias" (the sorted indices as
            Elias-omega codes of their gaps, :func:`~fl_sim.compression.coding.gap_stream_bits`).

    bits = 32 k + index bits (no scale is sent).
    """

    name = "topk"

    def __init__(
        self,
        *,
        dim: int,
        k: int | None = None,
        granularity: str = "vector",
        segments: list[int] | None = None,
        index_coding: str = "fixed",
    ) -> None:
        super().__init__(dim=dim)
        self.k = _check_k(k, dim, self.name)
        self._init_granularity(granularity, segments)
        self.index_coding = _check_choice(index_coding, "index_coding", self.name, CODINGS)
        self.ks = split_k(self.k, self.seg.lengths)

    def params(self) -> dict:
        return {"dim": self.dim, "k": self.k, **self._granularity_params(), "index_coding": self.index_coding}

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"indices": ((self.k,), torch.int64), "values": ((self.k,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        idx, vals = topk_segments(x, self.ks, self.seg)
        vals = to_wire_float(vals, "topk.encode", "a value")
        return Payload(self.name, self.dim, {"indices": idx, "values": vals}, self._bits(idx))

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """Top-k of every row of Z (C, d) in one selection (:func:`~fl_sim.compression.quantizers.topk_rows`)."""
        Z, seeds = self._check_batch(Z, seeds)
        if not seeds:
            return []
        idx, vals = topk_rows(Z, self.ks, self.seg)
        vals = to_wire_float(vals, "topk.encode", "a value")
        return [Payload(self.name, self.dim, {"indices": idx[i], "values": vals[i]}, self._bits(idx[i]))
                for i in range(len(seeds))]

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        payloads, seeds = self._check_decode_batch(payloads, seeds, validate=validate)
        out = torch.zeros(len(payloads), self.dim, dtype=torch.float32)
        if payloads:
            out.scatter_(1, _stack(payloads, "indices"), _stack(payloads, "values").to(torch.float32))
        return out

    def payload_bits(self, payload: Payload) -> int:
        """Counted from the received indices (Elias-coded gaps vary with them)."""
        return self._bits(payload.tensors["indices"])

    def _bits(self, idx: torch.Tensor) -> int:
        if self.index_coding == "fixed":
            return topk_bits(self.dim, self.k)
        return FLOAT_BITS * self.k + gap_stream_bits(idx)

    def check_values(self, payload: Payload) -> None:
        idx = payload.tensors["indices"]
        if int(idx.min()) < 0 or int(idx.max()) >= self.dim:
            raise PayloadError(f"topk.decode: indices outside 0..{self.dim - 1}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PayloadError("topk.decode: indices must be strictly increasing (sorted, no repeats)")
        if self.seg.count > 1 and not torch.equal(torch.bincount(self.seg.ids[idx], minlength=self.seg.count), self.ks):
            raise PayloadError("topk.decode: indices per tensor differ from the k_t split")
        if not bool(torch.isfinite(payload.tensors["values"]).all()):
            raise PayloadError("topk.decode: values must be finite")
        _check_bits(payload, self._bits(idx), "topk.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return scatter_dense(payload.tensors["indices"], payload.tensors["values"], self.dim)


@register_codec
class RandKCodec(Codec):
    """Random-k: k coordinates drawn uniformly without replacement from the seed (indices not sent).

    x_hat = c * (x on the k indices), c = d/k when ``unbiased`` (E[x_hat] = x,
    E||x_hat - x||^2 = (d/k - 1)||x||^2), else c = 1. bits = 32 k.
    """

    name = "randk"

    def __init__(self, *, dim: int, k: int | None = None, unbiased: bool = False) -> None:
        super().__init__(dim=dim)
        self.k = _check_k(k, dim, self.name)
        if not isinstance(unbiased, bool):
            raise CodecError(f"randk: unbiased must be true or false, got {unbiased!r}")
        self.unbiased = unbiased

    def params(self) -> dict:
        return {"dim": self.dim, "k": self.k, "unbiased": self.unbiased}

    def _indices(self, seed: int) -> torch.Tensor:
        return randk_indices(self.dim, self.k, generator=torch_generator(seed, "randk", "indices"))

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"values": ((self.k,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        vals = to_wire_float(x[self._indices(check_seed(seed, "randk.encode"))], "randk.encode", "a value")
        return Payload(self.name, self.dim, {"values": vals}, randk_bits(self.k))

    def check_values(self, payload: Payload) -> None:
        if not bool(torch.isfinite(payload.tensors["values"]).all()):
            raise PayloadError("randk.decode: values must be finite")
        _check_bits(payload, randk_bits(self.k), "randk.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        out = scatter_dense(self._indices(check_seed(seed, "randk.decode")), payload.tensors["values"], self.dim)
        if not self.unbiased:
            return out
        return to_wire_float(out.to(torch.float64) * (self.dim / self.k), "randk.decode", "(d/k) x_i")


@register_codec
class QSGDCodec(_Granular):
    """QSGD with s = ``levels`` ([Alistarh-2017], Section 3.1): x_hat_i = ||x||_2 sign(x_i) l_i / s.

    l_i = floor(s|x_i|/||x||_2) + Bernoulli(frac) in {0..s}: unbiased, and per scaled piece of n
    coordinates E||x_hat - x||^2 <= min(n/s^2, sqrt(n)/s) ||x||^2 (Lemma 3.1, :attr:`variance_bound`
    for the whole vector).

    Args:
        levels: s.
        granularity: "tensor" (default: one norm per model tensor, as GRACE and the paper's experiments,
            which quantize pieces of the gradient separately) or "vector" (one norm, the paper's Section 3
            analysis).
        segments: the tensor sizes (filled in by CompressedFedAvg).
        bucket: if set, each tensor (or the vector) is further cut into buckets of this many coordinates,
            each with its own norm (the "bucketing" of the paper's experiments; GRACE's bucket_size, 128).
        coding: "elias" (default: the paper's Code_s of Section 3.2, exact length of the real stream,
            :func:`~fl_sim.compression.coding.qsgd_stream_bits`) or "fixed" (32 per norm + d (1 +
            ceil(log2(s + 1))) bits).

    The payload carries the levels q and the norms; ``bits`` is the exact length of the chosen code.
    """

    name = "qsgd"

    def __init__(
        self,
        *,
        dim: int,
        levels: int = 4,
        granularity: str = "tensor",
        segments: list[int] | None = None,
        bucket: int | None = None,
        coding: str = "elias",
    ) -> None:
        super().__init__(dim=dim)
        self.levels = _check_count(levels, "levels", "qsgd", 2**20, "s quantization levels, e.g. 4")
        self._init_granularity(granularity, segments)
        if bucket is not None:
            self.bucket = _check_count(bucket, "bucket", "qsgd", 2**31 - 1, "coordinates per norm, e.g. 128")
            self.seg = self.seg.split(self.bucket)
        else:
            self.bucket = None
        self.coding = _check_choice(coding, "coding", self.name, CODINGS)

    def params(self) -> dict:
        return {"dim": self.dim, "levels": self.levels, **self._granularity_params(), "bucket": self.bucket,
                "coding": self.coding}

    @property
    def variance_bound(self) -> float:
        return qsgd_variance_bound(self.dim, self.levels)

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"norm": ((self.seg.count,), torch.float32), "q": ((self.dim,), level_dtype(self.levels))}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        gen = torch_generator(check_seed(seed, "qsgd.encode"), "qsgd")
        norm, q = qsgd_quantize(x, self.levels, generator=gen, seg=self.seg)
        norm = to_wire_float(norm, "qsgd.encode", "||x||_2")
        return Payload(self.name, self.dim, {"norm": norm, "q": q}, self._bits(q))

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """QSGD of every row of Z (C, d) at once; row i's roundings from client i's own generator."""
        Z, seeds = self._check_batch(Z, seeds)
        if not seeds:
            return []
        u = torch.stack([torch.rand((self.dim,), generator=torch_generator(check_seed(s, "qsgd.encode"), "qsgd"),
                                    dtype=torch.float32) for s in self._own_seeds(seeds)])
        norm, q = qsgd_quantize(Z, self.levels, seg=RowSegments(self.seg), uniform=u)
        norm = to_wire_float(norm, "qsgd.encode", "||x||_2")
        return [Payload(self.name, self.dim, {"norm": norm[i], "q": q[i]}, self._bits(q[i])) for i in range(len(seeds))]

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        payloads, seeds = self._check_decode_batch(payloads, seeds, validate=validate)
        if not payloads:
            return torch.zeros(0, self.dim)
        return qsgd_dequantize(_stack(payloads, "norm"), _stack(payloads, "q"), self.levels, self.seg)

    def payload_bits(self, payload: Payload) -> int:
        """Counted from the received levels (the Elias stream's length varies with them)."""
        return self._bits(payload.tensors["q"])

    def _bits(self, q: torch.Tensor) -> int:
        if self.coding == "elias":
            return qsgd_stream_bits(q, self.seg.count)
        return qsgd_bits(self.dim, self.levels, self.seg.count)

    def check_values(self, payload: Payload) -> None:
        norm, q = payload.tensors["norm"], payload.tensors["q"]
        _check_scales(norm, "qsgd.decode", "norms")
        if int(q.to(torch.int64).abs().max()) > self.levels:
            raise PayloadError(f"qsgd.decode: levels outside {{-{self.levels}..{self.levels}}}")
        self._zero_scale_levels(norm, q, "norm")
        _check_bits(payload, self._bits(q), "qsgd.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return qsgd_dequantize(payload.tensors["norm"], payload.tensors["q"], self.levels, self.seg)


@register_codec
class SignCodec(_Granular):
    """Scaled sign ([Karimireddy-2019]): x_hat = (||x||_1 / n) sign(x) per piece of n coordinates,
    sign(0) = +1. Biased (use error feedback).

    ``granularity``: "tensor" (default, one l1 scale per model tensor, as GRACE's EF-signSGD) or "vector"
    (one scale for the whole vector, as Algorithm 1 of the paper is written). bits = 32 per scale + d.
    """

    name = "sign"

    def __init__(self, *, dim: int, granularity: str = "tensor", segments: list[int] | None = None) -> None:
        super().__init__(dim=dim)
        self._init_granularity(granularity, segments)

    def params(self) -> dict:
        return {"dim": self.dim, **self._granularity_params()}

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"scale": ((self.seg.count,), torch.float32), "signs": ((self.dim,), torch.int8)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        scale, signs = scaled_sign(x, self.seg)
        scale = to_wire_float(scale, "sign.encode", "||x||_1 / d")
        return Payload(self.name, self.dim, {"scale": scale, "signs": signs}, sign_bits(self.dim, self.seg.count))

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """Scaled sign of every row of Z (C, d) at once (no randomness)."""
        Z, seeds = self._check_batch(Z, seeds)
        if not seeds:
            return []
        scale, signs = scaled_sign(Z, RowSegments(self.seg))
        scale = to_wire_float(scale, "sign.encode", "||x||_1 / d")
        bits = sign_bits(self.dim, self.seg.count)
        return [Payload(self.name, self.dim, {"scale": scale[i], "signs": signs[i]}, bits) for i in range(len(seeds))]

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        payloads, seeds = self._check_decode_batch(payloads, seeds, validate=validate)
        if not payloads:
            return torch.zeros(0, self.dim)
        return scaled_sign_decode(_stack(payloads, "scale"), _stack(payloads, "signs"), self.seg)

    def check_values(self, payload: Payload) -> None:
        _check_scales(payload.tensors["scale"], "sign.decode", "scales")
        if not bool((payload.tensors["signs"].abs() == 1).all()):
            raise PayloadError("sign.decode: signs must be -1 or +1")
        _check_bits(payload, sign_bits(self.dim, self.seg.count), "sign.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return scaled_sign_decode(payload.tensors["scale"], payload.tensors["signs"], self.seg)


@register_codec
class TernGradCodec(_Granular):
    """TernGrad ([Wen-2017]): x_hat_i = s_t sign(x_i) b_i, s_t = max |x| over the layer t,
    b_i ~ Bernoulli(|x_i|/s_t), after clipping x to [-c sigma_t, c sigma_t].

    Args:
        granularity: "tensor" (default: the paper's layer-wise ternarizing, one scale per layer) or
            "vector" (one scale for the whole vector).
        segments: the layer sizes (filled in by CompressedFedAvg).
        clip_sigma: c of the paper's gradient clipping (Section 3.3; default 2.5), sigma_t the standard
            deviation of the layer's elements; ``None`` turns clipping off.

    Unbiased for the clipped input (clipping itself trades a bias for a much smaller variance on
    heavy-tailed updates). bits = 32 per scale + 2 d (2 bits per ternary value).
    Departure: the paper's "scaler sharing" (all workers use the max of their scales) needs an extra
    exchange per round and is not done; each client sends its own scales.
    """

    name = "terngrad"

    def __init__(
        self,
        *,
        dim: int,
        granularity: str = "tensor",
        segments: list[int] | None = None,
        clip_sigma: float | None = 2.5,
    ) -> None:
        super().__init__(dim=dim)
        self._init_granularity(granularity, segments)
        if clip_sigma is not None and (
            isinstance(clip_sigma, bool) or not isinstance(clip_sigma, (int, float)) or not clip_sigma > 0
        ):
            raise CodecError(f"terngrad: clip_sigma must be a positive number (the paper: 2.5) or null, got {clip_sigma!r}")
        self.clip_sigma = None if clip_sigma is None else float(clip_sigma)

    def params(self) -> dict:
        return {"dim": self.dim, **self._granularity_params(), "clip_sigma": self.clip_sigma}

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"scale": ((self.seg.count,), torch.float32), "q": ((self.dim,), torch.int8)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        gen = torch_generator(check_seed(seed, "terngrad.encode"), "terngrad")
        s, q = terngrad_quantize(x, generator=gen, seg=self.seg, clip_sigma=self.clip_sigma)
        s = to_wire_float(s, "terngrad.encode", "the layer scale")
        return Payload(self.name, self.dim, {"scale": s, "q": q}, terngrad_bits(self.dim, self.seg.count))

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """TernGrad of every row of Z (C, d) at once; row i's Bernoulli draws from client i's own generator."""
        Z, seeds = self._check_batch(Z, seeds)
        if not seeds:
            return []
        u = torch.stack([torch.rand((self.dim,), generator=torch_generator(check_seed(sd, "terngrad.encode"), "terngrad"),
                                    dtype=torch.float32) for sd in self._own_seeds(seeds)])
        s, q = terngrad_quantize(Z, seg=RowSegments(self.seg), clip_sigma=self.clip_sigma, uniform=u)
        s = to_wire_float(s, "terngrad.encode", "the layer scale")
        bits = terngrad_bits(self.dim, self.seg.count)
        return [Payload(self.name, self.dim, {"scale": s[i], "q": q[i]}, bits) for i in range(len(seeds))]

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        payloads, seeds = self._check_decode_batch(payloads, seeds, validate=validate)
        if not payloads:
            return torch.zeros(0, self.dim)
        return terngrad_dequantize(_stack(payloads, "scale"), _stack(payloads, "q"), self.seg)

    def check_values(self, payload: Payload) -> None:
        s, q = payload.tensors["scale"], payload.tensors["q"]
        _check_scales(s, "terngrad.decode", "scales")
        if int(q.to(torch.int64).abs().max()) > 1:
            raise PayloadError("terngrad.decode: levels must be in {-1, 0, 1}")
        self._zero_scale_levels(s, q, "scale")
        _check_bits(payload, terngrad_bits(self.dim, self.seg.count), "terngrad.decode")

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)
        return terngrad_dequantize(payload.tensors["scale"], payload.tensors["q"], self.seg)
