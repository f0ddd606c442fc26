"""FetchSGD: Count Sketch uplink with momentum and error accumulated in sketch space at the server.

Rothchild et al., "FetchSGD: Communication-Efficient Federated Learning with Sketching", ICML 2020,
Algorithm 1 ([Rothchild-2020], docs/references.md; summary in docs/notes.md#fetchsgd). Its reference code is
CommEfficient with the csvec sketch (``fed_aggregator.py``: ``_server_helper_sketched``,
``_server_helper_true_topk``, ``_server_helper_local_topk``).

One sketch S(·) (r rows × c columns, hashes from the run seed, the same for all clients and rounds,
so sketches of different rounds can be added). Round t (``mode="sketch"``, Algorithm 1):

1. client i sends S(Δ_i) (``count_sketch`` codec; Δ_i = local − global);
2. server: S^t = Σ_i (n_i/n) S(Δ_i)                           (linearity)
3. momentum:  S_u ← ρ S_u + S^t
4. error:     S_e ← S_e + η_s S_u      (the learning rate scales the momentum sketch before it enters
                                        the error sketch, as Algorithm 1's "error feedback" line)
5. Δ = Top-k(U(S_e)): unsketch the k heavy coordinates of S_e (median estimates over the r rows),
   selected as the authors' csvec does, ``torch.topk(est**2, k)`` over all d estimates, exact ties broken
   the same way (:func:`~fl_sim.compression.sketch.topk_abs`)
6. error removal (``error_removal``):
   * "zero" (default; the authors' code): S_e is zeroed at the buckets of nz(Δ). Their code notes
     that the linear removal "should work but doesn't (model diverges)";
   * "subtract": S_e ← S_e − S(Δ), Algorithm 1's "error accumulation" line as printed;
   S_u is zeroed at the buckets of nz(Δ) either way (momentum factor masking, as the authors' code:
   ``Vvelocity[nz[:,0], nz[:,1]] = 0``, an indexed assignment, zeroes those buckets in place; their
   nz is the nonzero buckets of S(Δ), which leaves out a bucket whose entries of Δ cancel exactly);
7. the inner strategy gets w + Δ from every client (FedAvg: w ← w + Δ; FedAdam: its step on Δ).

Where the learning rate goes: Algorithm 1 accumulates η_s S_u into S_e (step 4). The authors' code
accumulates S_u unscaled and multiplies the unsketched update by the learning rate instead
(``return update * lr``). For a constant η_s the two give the same Δ (scaling S_e scales its estimates,
its top-k set, and what is zeroed or subtracted), so they differ only under a learning-rate schedule,
where the code applies the error accumulated at an old rate at the new one.

Sketch shape: the paper's sketches have 5 rows and unsketch k well below the number of columns
(CIFAR-10: r = 5, c = 500,000, k = 50,000 for d = 6.5M); ``rows=1`` (one wide row) is an option
that fl-sim's earlier configs used (each estimate then collides with fewer coordinates at equal cells,
but there is no median to reject collisions).

Ablations of the paper (``mode``):

* "true_topk": clients send Δ_i uncompressed (32 d bits); the server keeps dense momentum u and
  error e: u ← ρ u + Δ̄, e ← e + η_s u, Δ = Top-k(e), e and u zeroed on nz(Δ) (the authors' code).
* "local_topk": clients send Top-k(Δ_i + r_i) with their own error feedback r_i (``topk`` codec,
  classic EF in the client's state); the server applies global momentum only: u ← ρ u + Δ̄,
  w ← w + η_s u (no server error: the authors' code "can't do virtual error with local topk").

ρ = 0 in mode "sketch" gives "Count Sketch + error feedback", the baseline of Tang et al. (FetchSGD
without momentum). The server knows ‖S_e‖ before and after extraction; it reports their ratio.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import Strategy

from fl_sim.wire import keys
from fl_sim.compression.sketch import CountSketch, topk_abs
from fl_sim.rng import derive_seed
from fl_sim.strategies.base import ClientReply
from fl_sim.strategies.compressed import CompressedFedAvg

__all__ = ["FetchSGD"]

MODES = ("sketch", "true_topk", "local_topk")
DEFAULT_COMPRESSION, DEFAULT_K_RATIO = 10.0, 0.02  # README's row: d/10 floats up, k = 2% of d
ERROR_REMOVALS = ("zero", "subtract")


class FetchSGD(CompressedFedAvg):
    """FetchSGD ([Rothchild-2020], Alg. 1) and its true / local top-k ablations.

    Args:
        inner: the aggregating strategy (None: FedAvg with ``**kwargs``); it gets w + Δ.
        rows, cols: sketch size r × c (uplink 32·r·c bits per client); paper shape: 5 rows.
        k: coordinates unsketched and applied per round (well below c in the paper).
        compression: sized by the model instead: cols = round(d / (compression · rows)), so the uplink
            is d / compression floats. Give ``cols`` or ``compression``; with neither, compression = 10.
        k_ratio: k = round(k_ratio · d). Give ``k`` or ``k_ratio``; with neither, k_ratio = 0.02.
        The defaults are README's row: ``FetchSGD(inner)`` is ``FetchSGD(inner, rows=5, compression=10,
        k_ratio=0.02, momentum=0.9)`` (d/10 floats up, 2% of the coordinates applied per round).
        momentum: ρ (0 = Count Sketch + error feedback).
        mode: "sketch" (FetchSGD), "true_topk" or "local_topk" (the paper's ablations; module doc).
        error_removal: "zero" (authors' code, default) or "subtract" (Algorithm 1 as printed).
        **kwargs: UpdateStrategy arguments; server_lr is η_s.
    """

    STATE_ATTRS = CompressedFedAvg.STATE_ATTRS + ("s_u", "s_e")  # momentum and error (sketches or dense)

    def __init__(self, inner: Strategy | None = None, *, rows: int = 5, cols: int | None = None, k: int | None = None,
                 compression: float | None = None, k_ratio: float | None = None, momentum: float = 0.9,
                 mode: str = "sketch", error_removal: str = "zero", **kwargs: Any) -> None:
        if cols is not None and compression is not None:
            raise ValueError(f"cols={cols} and compression={compression}: give one (the sketch width, or d / uplink)")
        if k is not None and k_ratio is not None:
            raise ValueError(f"k={k} and k_ratio={k_ratio}: give one")
        if cols is None and compression is None:
            compression = DEFAULT_COMPRESSION
        if k is None and k_ratio is None:
            k_ratio = DEFAULT_K_RATIO
        kwargs.pop("codec", None)
        kwargs.pop("codec_params", None)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use one of {', '.join(map(repr, MODES))}")
        if error_removal not in ERROR_REMOVALS:
            raise ValueError(f"error_removal={error_removal!r}: use 'zero' (authors' code) or 'subtract' (Alg. 1)")
        if mode == "local_topk":
            kwargs.setdefault("error_feedback", "classic")  # the clients' own error accumulation
            codec, params = "topk", {"k": k or 1}  # sized per round by codec_params_for
        else:
            kwargs.setdefault("error_feedback", "none")  # error accumulation is at the server
            codec, params = ("count_sketch", {"rows": rows, "cols": cols or 1, "k": k or 1}) if mode == "sketch" \
                else ("identity", {})
        super().__init__(inner, codec=codec, codec_params=params, **kwargs)
        if rows < 1 or (cols is not None and cols < 1) or (k is not None and k < 1):
            raise ValueError(f"rows={rows}, cols={cols}, k={k}: all must be >= 1")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}: ρ must be in [0, 1)")
        if compression is not None and not compression > 0:
            raise ValueError(f"compression={compression}: d / (rows · cols) must be > 0")
        if k_ratio is not None and not 0 < k_ratio <= 1:
            raise ValueError(f"k_ratio={k_ratio}: k/d must be in (0, 1]")
        self.rows, self.rho = int(rows), float(momentum)
        self.cols = None if cols is None else int(cols)
        self.k = None if k is None else int(k)
        self.mode, self.error_removal = mode, error_removal
        self.compression, self.k_ratio = compression, k_ratio
        self.sketch_seed = derive_seed(self.seed, "fetchsgd-hashes")
        self.s_u: torch.Tensor | None = None
        self.s_e: torch.Tensor | None = None
        self._last: dict[str, float] = {}

    def round_seed_for(self, server_round: int) -> int:
        if self.mode != "sketch":
            return super().round_seed_for(server_round)
        return self.sketch_seed  # one sketch (hashes) for every round

    def k_for(self, dim: int) -> int:
        """k of this run: ``k``, or round(k_ratio · d)."""
        return int(self.k if self.k_ratio is None else max(1, round(self.k_ratio * dim)))

    def codec_params_for(self, dim: int) -> dict[str, Any]:
        if self.mode == "local_topk":
            return {**super().codec_params_for(dim), "k": self.k_for(dim)}
        if self.mode == "true_topk":
            return super().codec_params_for(dim)
        cols = self.cols if self.compression is None else max(1, round(dim / (self.compression * self.rows)))
        return {"rows": self.rows, "cols": int(cols), "k": self.k_for(dim)}

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        super().round_config(server_round, config)
        if self.mode == "sketch":
            config[keys.SEED_MODE] = "shared"

    def decodes_each(self) -> bool:
        return False  # combine works on the payloads themselves (compressed domain)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        if self.mode == "true_topk":
            return self._combine_true_topk(server_round, replies, weights)
        if self.mode == "local_topk":
            return self._combine_local_topk(server_round, replies, weights)
        d = self.global_vector.numel()
        codec = self.codec
        cs: CountSketch = codec.sketcher(self.sketch_seed)  # the clients' hashes, built once
        s_t = codec.aggregate([r.data for r in replies], weights.tolist()).tensors["table"].to(torch.float32)
        if self.s_u is None:
            self.s_u = torch.zeros_like(s_t)
            self.s_e = torch.zeros_like(s_t)
        self.s_u.mul_(self.rho).add_(s_t)  # step 3
        self.s_e.add_(self.server_lr * self.s_u)  # step 4: η_s on the momentum sketch (Algorithm 1)
        before = float(self.s_e.norm())
        delta, idx = cs.unsketch_topk(self.s_e, min(codec.k, d))  # step 5
        cs.zero_coordinates(self.s_u, idx)  # step 6: momentum masking
        if self.error_removal == "subtract":
            self.s_e.sub_(cs.sketch(delta))
        else:
            cs.zero_coordinates(self.s_e, idx)
        self._last = {
            "sketch_error_norm": float(self.s_e.norm()),
            "extracted_share": 1.0 - float(self.s_e.norm()) / before if before > 0 else 0.0,
            "update_nnz": int((delta != 0).sum()),
        }
        return delta.to(torch.float32)

    def _combine_true_topk(self, server_round, replies, weights) -> torch.Tensor:
        # dense weighted average of the uncompressed Δ_i (the base returns them one per row)
        g = weights.to(torch.float32) @ super().combine(server_round, replies, weights)
        if self.s_u is None:
            self.s_u, self.s_e = torch.zeros_like(g), torch.zeros_like(g)
        self.s_u.mul_(self.rho).add_(g)
        self.s_e.add_(self.server_lr * self.s_u)
        before = float(self.s_e.norm())
        idx = topk_abs(self.s_e, min(self.k_for(g.numel()), g.numel()))  # CommEfficient's _topk (topk of e**2)
        delta = torch.zeros_like(g)
        delta[idx] = self.s_e[idx]
        self.s_e[idx] = 0.0
        self.s_u[idx] = 0.0
        self._last = {"error_norm": float(self.s_e.norm()),
                      "extracted_share": 1.0 - float(self.s_e.norm()) / before if before > 0 else 0.0,
                      "update_nnz": int((delta != 0).sum())}
        return delta

    def _combine_local_topk(self, server_round, replies, weights) -> torch.Tensor:
        # weighted average of the clients' (error-fed) top-k
        g = weights.to(torch.float32) @ super().combine(server_round, replies, weights)
        if self.s_u is None:
            self.s_u = torch.zeros_like(g)
        self.s_u.mul_(self.rho).add_(g)
        self._last = {"update_nnz": int((self.s_u != 0).sum())}
        return self.server_lr * self.s_u

    def server_update(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        return delta  # η_s and ρ are applied in combine (sketch space, or the ablations' dense state)

    def extra_metrics(self, server_round, usable, delta) -> dict[str, float]:
        return dict(self._last)
