"""Count Sketch codec (FetchSGD, [Rothchild-2020]; summary in docs/notes.md#fetchsgd).

The client sends the r x c table S(x) of :class:`~fl_sim.compression.sketch.CountSketch`; tables are
linear in x, so the server sums them (weighted) and unsketches once: the k coordinates of largest
estimated magnitude (median over rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fl_sim.compression.base import Codec, CodecError, Payload, SeedCache, Seeds, register_codec
from fl_sim.compression.sketch import CountSketch

__all__ = ["CountSketchCodec"]


def _pos_int(name: str, value: Any, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodecError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


@register_codec
class CountSketchCodec(Codec):
    """x -> S(x) in R^{r x c} (Count Sketch); decode = U_k(S): the top-k heavy hitters of the estimate.

        S(x)[j, b] = sum_{i : h_j(i) = b} s_j(i) x_i,   x_hat_i = median_j s_j(i) S[j, h_j(i)],
        decode(S)  = x_hat on the k coordinates of largest |x_hat_i|, 0 elsewhere.

    h_j, s_j: bucket and sign hashes of row j, rebuilt from the seed (``CountSketch(d, r, c, seed=seed)``,
    the same call a FetchSGD server makes, so its tables match the clients'). Linear: payloads are
    summed before one decode.

    Bits: 32 r c (float32 table entries; hashes are shared randomness, never sent).

    Args:
        rows: r >= 1.  cols: c >= 1.  k: coordinates kept by decode (clipped to d).
    """

    name = "count_sketch"
    linear = True

    def __init__(self, *, dim: int, rows: int = 5, cols: int = 1000, k: int = 100) -> None:
        super().__init__(dim=dim)
        self.rows = _pos_int("rows", rows, self.name)
        self.cols = _pos_int("cols", cols, self.name)
        self.k = _pos_int("k", k, self.name)
        self._sketches = SeedCache(lambda s: CountSketch(self.dim, self.rows, self.cols, seed=s), size=2)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "rows": self.rows, "cols": self.cols, "k": self.k}

    def nominal_bits(self) -> int:
        return 32 * self.rows * self.cols

    def sketcher(self, seed: int) -> CountSketch:
        """The CountSketch of this seed (cached: building hashes costs O(r d))."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise CodecError(f"{self.name}: seed must be an int, got {seed!r}")
        return self._sketches(seed)

    def _payload(self, table: torch.Tensor, meta: dict | None = None) -> Payload:
        return Payload(codec=self.name, dim=self.dim, tensors={"table": table}, bits=self.nominal_bits(),
                       meta=meta or {})

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"table": ((self.rows, self.cols), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        table = self.sketcher(seed).sketch(x)
        if not torch.isfinite(table).all():  # a cell sums up to d entries: reject here, not at decode
            raise CodecError(f"{self.name}.encode: the sketch overflows float32 (|x| up to "
                             f"{float(x.abs().max()):.3g}); scale the update down")
        return self._payload(table)

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """S(z_i) for every row of Z (C, d) with the round's common hashes: one sketch call for the block
        (the Numba kernel fills each row's table in the order ``encode`` does). Decode keeps the default
        loop: a top-k unsketch per client, which is what ``decode`` is."""
        Z, seeds = self._check_batch(Z, seeds)
        seed = self._common_seed(seeds)
        if not seeds or seed is None:  # rows of different rounds: one hash family each
            return super().encode_batch(Z, seeds)
        tables = self.sketcher(seed).sketch(Z)
        if not torch.isfinite(tables).all():
            raise CodecError(f"{self.name}.encode: the sketch overflows float32 (|x| up to "
                             f"{float(Z.abs().max()):.3g}); scale the update down")
        return [self._payload(tables[i]) for i in range(len(seeds))]

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Payload of sum_i w_i S(x_i) = S(sum_i w_i x_i)."""
        payloads = list(payloads)
        w = [float(v) for v in weights]
        if not payloads or len(payloads) != len(w):
            raise CodecError(f"{self.name}.aggregate: need one weight per payload, got {len(payloads)} and {len(w)}")
        for p in payloads:
            self.check_values(p)
        tables = torch.stack([p.tensors["table"] for p in payloads])
        weights_t = torch.tensor(w, dtype=torch.float32)
        return self._payload(torch.tensordot(weights_t, tables, dims=1), {"aggregated": len(payloads)})

    def check_values(self, payload: Payload) -> None:
        """Raise PayloadError unless ``table`` is a finite float32 (rows, cols) table (any finite value is possible)."""
        self.check_payload(payload, {"table": ((self.rows, self.cols), torch.float32)})

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_values(payload)
        values, _ = self.sketcher(seed).unsketch_topk(payload.tensors["table"], min(self.k, self.dim))
        return values
