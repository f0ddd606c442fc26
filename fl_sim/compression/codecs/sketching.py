"""Count Sketch codec (FetchSGD, Rothchild et al. 2020; summarised in shared/papers/README.md).

The client sends the r x c table S(x) of :class:`~fl_sim.compression.sketch.CountSketch`; tables are
linear in x, so the server sums them (weighted) and unsketches once: the k coordinates of largest
estimated magnitude (median over rows).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..base import Codec, CodecError, Payload, SeedCache, register_codec
from ..sketch import CountSketch

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

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        return self._payload(self.sketcher(seed).sketch(x))

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
