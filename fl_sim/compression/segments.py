"""Tensor segments of a flat update: the scale granularity of the quantizers.

A model update Δ is the concatenation of the model's tensors (``fl_sim.wire.records.flatten_arrays``). GRACE
and the QSGD / TernGrad papers quantize each tensor with its own scale (TernGrad: "layer-wise
ternarizing"; QSGD's experiments: buckets), not the whole flattened vector with one scale. A
:class:`Segments` holds the tensor lengths in flatten order and does the per-segment reductions with
tensor ops (``scatter_reduce`` / ``index_add`` over a segment-id vector), batched over leading dims:
no Python loop over coordinates or tensors.

Codec parameters (shared by qsgd, terngrad, sign, topk; see docs/codecs.md):
  * ``granularity``: "tensor" (one scale per segment) or "vector" (one scale for the whole vector);
  * ``segments``: the tensor lengths, summing to ``dim``; ``None`` means one segment (the whole vector).
    ``CompressedFedAvg.round_config`` fills it from the global model's shapes, and clients build the
    codec from the same parameters, so both sides agree.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fl_sim.compression.base import CodecError

__all__ = ["GRANULARITIES", "Segments", "RowSegments", "check_granularity", "segments_for"]

GRANULARITIES = ("tensor", "vector")


class Segments:
    """Contiguous segments of a vector of length ``dim`` (lengths >= 1, in order, summing to dim).

    Attributes:
        lengths: int64 (T,);  starts: int64 (T,) offsets;  ids: int64 (dim,) segment of each coordinate.
    """

    def __init__(self, lengths: Sequence[int], dim: int) -> None:
        self.dim = int(dim)
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.int64)
        self.count = int(self.lengths.numel())
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.ids = torch.repeat_interleave(torch.arange(self.count), self.lengths)

    @classmethod
    def whole(cls, dim: int) -> "Segments":
        return cls([dim], dim)

    def split(self, bucket: int) -> "Segments":
        """Each segment cut into consecutive buckets of ``bucket`` coordinates (the last one may be shorter)."""
        full = self.lengths // bucket
        rest = self.lengths % bucket
        per = full + (rest > 0).to(torch.int64)  # buckets per segment
        seg_of = torch.repeat_interleave(torch.arange(self.count), per)
        rank = torch.arange(int(per.sum())) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
        last = rank == per[seg_of] - 1
        lengths = torch.where(last & (rest[seg_of] > 0), rest[seg_of], torch.full_like(rank, bucket))
        return Segments(lengths.tolist(), self.dim)

    # -- reductions along the last dim: (..., dim) -> (..., T) -----------------------------------------
    def _reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.count == 1:
            return x.amax(dim=-1, keepdim=True) if op == "amax" else x.sum(dim=-1, keepdim=True)
        out = torch.zeros(*x.shape[:-1], self.count, dtype=x.dtype)
        index = self.ids.expand(x.shape)
        if op == "amax":  # every segment is non-empty, so include_self=False never leaves the 0 fill
            return out.scatter_reduce_(-1, index, x, "amax", include_self=False)
        return out.scatter_add_(-1, index, x)

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """max of x over each segment."""
        return self._reduce(x, "amax")

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """sum of x over each segment."""
        return self._reduce(x, "sum")

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """(..., T) -> (..., dim): each segment's value repeated over its coordinates."""
        if self.count == 1:
            return v.expand(*v.shape[:-1], self.dim)
        return v.index_select(-1, self.ids)


class RowSegments(Segments):
    """The segments of ``seg`` for a block (C, dim) of C vectors, each row reduced exactly as a lone vector.

    A sum over one whole segment is ``x.sum(dim=-1)``, whose order of additions torch chooses by shape: a
    (C, d) block is summed row by row, a lone (d,) vector of d >= 32,768 in two passes over the threads'
    chunks, so the float results differ in the last bits. Here such sums are taken row by row on the rows
    as 1-D tensors (C small calls), which is what a codec's ``encode`` of each row computes; the segment
    sums of several segments (``scatter_add_``, sequential along a row) and every max are the same either
    way. Used by the codecs' ``encode_batch`` (bitwise the payloads of ``encode``).
    """

    def __init__(self, seg: Segments) -> None:
        self.dim, self.lengths, self.count, self.starts, self.ids = seg.dim, seg.lengths, seg.count, seg.starts, seg.ids

    def _reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.count == 1 and op == "sum" and x.dim() > 1:
            rows = x.reshape(-1, x.shape[-1])
            return torch.stack([r.sum(dim=-1, keepdim=True) for r in rows]).reshape(*x.shape[:-1], 1)
        return super()._reduce(x, op)


def check_granularity(granularity: object, segments: object, dim: int, who: str) -> tuple[str, tuple[int, ...] | None]:
    """Validate the two codec parameters; returns (granularity, segments as a tuple or None).

    ``segments`` must be positive ints summing to ``dim`` (the model's tensor sizes in flatten order).
    """
    if granularity not in GRANULARITIES:
        raise CodecError(f"{who}: granularity must be 'tensor' or 'vector', got {granularity!r}")
    if segments is None:
        return str(granularity), None
    if isinstance(segments, (str, bytes)) or not isinstance(segments, (list, tuple)) or not segments:
        raise CodecError(f"{who}: segments must be a non-empty list of tensor sizes, got {segments!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in segments):
        raise CodecError(f"{who}: segments must be positive ints (tensor sizes), got {list(segments)!r}")
    if sum(segments) != dim:
        raise CodecError(
            f"{who}: segments sum to {sum(segments)} but dim is {dim}; give the model's tensor sizes in flatten order"
        )
    return str(granularity), tuple(int(n) for n in segments)


def segments_for(granularity: str, segments: tuple[int, ...] | None, dim: int) -> Segments:
    """The Segments a codec quantizes over: the tensors with "tensor", the whole vector otherwise."""
    if granularity == "tensor" and segments is not None:
        return Segments(segments, dim)
    return Segments.whole(dim)
