"""Compressed-sensing codecs: ``cs_fiht`` (Tang et al.) and ``onebit_cs`` (Mitra & Khisti).

* ``cs_fiht``: shared/papers/003_0f8b3e65132592f6.txt (slides), NOTES.md §4(a): y = Phi x with
  Phi = sqrt(d/Q) (Q random rows of the DCT or WHT), recovery by FIHT (K-sparse).
* ``onebit_cs``: shared/papers/000_2a9201d51a7b29c4.txt eqs. (4), (6), (9), (10) and the "same Phi"
  note (NOTES.md §1), with the 1-bit dithered quantizer of Abdi's thesis (002_*.txt eq. 4.5) in its
  unbiased form (NOTES.md §3.1 / App. A erratum): v_hat = rho (q/2 - u), rho = 2 ||v||_inf.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ...rng import derive_seed, torch_generator
from ..base import Codec, CodecError, LinearOperator, Payload, PayloadError, SeedCache, register_codec
from ..projections import PartialHadamard, SubsampledOrthogonal
from ..recovery import LP_MAX_ENTRIES, biht, fast_operator, fiht, l1_recovery_lp

__all__ = ["CSFIHTCodec", "OneBitCSCodec"]


def _pos_int(name: str, value: Any, who: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodecError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def _check_seed(seed: Any, who: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CodecError(f"{who}: seed must be an int, got {seed!r}")
    return seed


def _check_weights(who: str, payloads: list[Payload], weights: Sequence[float]) -> torch.Tensor:
    w = [float(v) for v in weights]
    if not payloads or len(payloads) != len(w):
        raise CodecError(f"{who}.aggregate: need one weight per payload, got {len(payloads)} and {len(w)}")
    if not all(math.isfinite(v) for v in w):
        raise CodecError(f"{who}.aggregate: weights must be finite, got {w}")
    return torch.tensor(w, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
@register_codec
class CSFIHTCodec(Codec):
    """Tang et al.'s compressed sensing: y = Phi x (Q floats), decode = FIHT(y; Phi, K).

        Phi = sqrt(n/Q) S B,   y = Phi x in R^Q,   x_hat = FIHT(y, Phi, K)   (||x_hat||_0 <= K)

    B: orthonormal d x d DCT-II (``transform="dct"``, n = d) or the normalized Walsh-Hadamard matrix of
    size n = next_pow2(d) (``"wht"``, x zero-padded); S: Q rows drawn uniformly without replacement
    from ``seed`` (:class:`~fl_sim.compression.projections.SubsampledOrthogonal`). Tang et al. use ONE
    Phi for every client and round ("for-all" scheme): the strategy passes the same seed each time.
    Linear: the server sums weighted measurements and recovers once. FIHT: see
    :func:`~fl_sim.compression.recovery.fiht`.

    Bits: 32 Q (float32 measurements; the row indices are shared randomness).

    Also :meth:`measure` (x -> Phi x) and :meth:`recover` (y -> FIHT(y)) for a server that keeps error
    feedback in measurement space (Phi p = eta y_bar + Phi e).

    Args:
        measurements: Q (1 <= Q <= n).  sparsity: K (default Q // 4, clipped to d).
        transform: "dct" or "wht".  max_iter, tol: FIHT stopping rule.
    """

    name = "cs_fiht"
    linear = True

    def __init__(
        self,
        *,
        dim: int,
        measurements: int,
        sparsity: int | None = None,
        transform: str = "dct",
        max_iter: int = 25,
        tol: float = 1e-4,
    ) -> None:
        super().__init__(dim=dim)
        self.measurements = _pos_int("measurements", measurements, self.name)
        if transform not in ("dct", "wht"):
            raise CodecError(f"{self.name}: transform must be 'dct' or 'wht', got {transform!r}")
        n = dim if transform == "dct" else 1 << (dim - 1).bit_length()
        if measurements > n:
            raise CodecError(f"{self.name}: measurements Q={measurements} exceeds n={n} ({transform} of d={dim}); "
                             f"use Q <= {n}")
        self.sparsity = _pos_int("sparsity", sparsity, self.name, allow_none=True) or max(1, measurements // 4)
        self.transform = transform
        self.max_iter = _pos_int("max_iter", max_iter, self.name)
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise CodecError(f"{self.name}: tol must be a number >= 0, got {tol!r}")
        self.tol = float(tol)
        self._ops = SeedCache(self._build)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "measurements": self.measurements, "sparsity": self.sparsity,
                "transform": self.transform, "max_iter": self.max_iter, "tol": self.tol}

    def nominal_bits(self) -> int:
        return 32 * self.measurements

    def _build(self, seed: int) -> tuple[LinearOperator, LinearOperator]:
        op = SubsampledOrthogonal(self.dim, self.measurements, seed=derive_seed(seed, "cs_fiht", "phi"),
                                  transform=self.transform)
        return op, fast_operator(op, torch.float32)

    def operator(self, seed: int) -> LinearOperator:
        """Phi for this seed (a SubsampledOrthogonal, cached)."""
        return self._ops(_check_seed(seed, self.name))[0]

    def measure(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Phi x as float32 (Q,); x of shape (d,) or (C, d) -> (C, Q)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            raise CodecError(f"{self.name}.measure: expected a tensor of shape (d,) or (C, d)")
        if x.dim() == 1:
            x = self.check_input(x)
        elif x.shape[-1] != self.dim or not torch.is_floating_point(x) or not torch.isfinite(x).all():
            raise CodecError(f"{self.name}.measure: expected a finite float tensor of shape (C, {self.dim})")
        _, fast = self._ops(_check_seed(seed, self.name))
        return fast.forward(x.to(torch.float32)).to(torch.float32)

    def recover(self, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """FIHT(y; Phi, K) as float32 (d,)."""
        op = self.operator(seed)
        return fiht(y.to(torch.float32), op, self.sparsity, max_iter=self.max_iter, tol=self.tol).to(torch.float32)

    def _payload(self, y: torch.Tensor, meta: dict | None = None) -> Payload:
        return Payload(codec=self.name, dim=self.dim, tensors={"y": y}, bits=self.nominal_bits(), meta=meta or {})

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        y = self.measure(x, seed=seed)
        if not torch.isfinite(y).all():  # reject here, not at decode
            raise CodecError(f"{self.name}.encode: the measurements overflow float32 (|x| up to "
                             f"{float(x.abs().max()):.3g}); scale the update down")
        return self._payload(y)

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Payload of sum_i w_i y_i = Phi (sum_i w_i x_i)."""
        payloads = list(payloads)
        w = _check_weights(self.name, payloads, weights)
        for p in payloads:
            self.check_payload(p, {"y": ((self.measurements,), torch.float32)})
        y = torch.tensordot(w, torch.stack([p.tensors["y"] for p in payloads]), dims=1)
        return self._payload(y, {"aggregated": len(payloads)})

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(payload, {"y": ((self.measurements,), torch.float32)})
        return self.recover(payload.tensors["y"], seed=seed)


# ------------------------------------------------------------------------------------------------
@register_codec
class OneBitCSCodec(Codec):
    """1-bit quantized compressive sampling (Mitra & Khisti eq. 9) with an unbiased dithered quantizer.

    Encode (shared randomness from ``seed``: Phi and the dither u):

        v = Phi x                 Phi = (1/sqrt(k)) S H_n R per block (PartialHadamard, Abdi eq. 4.1), m rows
        rho = 2 ||v||_inf         (eq. 4.5)
        q = sign(v / rho + u),    u ~ U(-1/2, 1/2)^m,  sign(t) = +1 if t > 0 else -1
        sent: q (m bits) and rho (32 bits)

    Dequantize (NOTES §3.1 erratum: the printed v_hat = rho (q - u) is biased by a factor 2):

        v_hat = rho (q/2 - u),    v_hat - v uniform on [-rho/2, rho/2], independent of v:
        E[v_hat] = v,  Var[v_hat_i] = rho^2 / 12,  |v_hat_i - v_i| <= rho/2.

    Recover (``recovery``):
      * "none": x_hat = Phi^T v_hat, unbiased since E[Phi^T Phi] = I (Abdi Lemma 6, eq. 4.3);
      * "lp":   eq. (6) blockwise: min ||x_b||_1 s.t. |v_hat_b - Phi_b x_b| <= rho/2 per measurement
                (:func:`~fl_sim.compression.recovery.l1_recovery_lp`; the box is exact for this quantizer);
      * "biht": BIHT with the known dither threshold, q = sign(Phi x + rho u), which recovers the
                direction and the norm (:func:`~fl_sim.compression.recovery.biht`). An aggregated
                payload (phi="common") is a weighted mean of dequantized measurements, no longer
                1-bit: it is recovered K-sparse by FIHT on v_hat instead.

    ``phi="per_worker"`` (eqs. 9-10): each worker encodes with its own seed (own Phi^(k) and u);
    payloads are decoded one by one (not linear). ``phi="common"``: one seed for everybody; the codec is
    linear in the dequantized domain, :meth:`aggregate` returns sum_i w_i v_hat_i (all workers share
    u, so the dither errors are correlated: E is still exact, the variance does not average down),
    and decode recovers once.

    Bits: m + 32 (one bit per measurement, rho as float32).

    Args:
        measurements: M; with ``block`` set, rounded down to a multiple of the B = ceil(d / block)
            blocks (k = M // B rows each, at least 1); m = B k is the actual count (``self.m``).
        phi: "per_worker" or "common".  recovery: "none", "lp" or "biht".
        block: power-of-2 block length n of the partial Hadamard (None: one block of next_pow2(d)).
        sparsity: K for BIHT (default m // 4).  biht_iter: BIHT iterations.
    """

    name = "onebit_cs"

    def __init__(
        self,
        *,
        dim: int,
        measurements: int,
        phi: str = "per_worker",
        recovery: str = "none",
        block: int | None = None,
        sparsity: int | None = None,
        biht_iter: int = 50,
    ) -> None:
        super().__init__(dim=dim)
        measurements = _pos_int("measurements", measurements, self.name)
        if phi not in ("per_worker", "common"):
            raise CodecError(f"{self.name}: phi must be 'per_worker' or 'common', got {phi!r}")
        if recovery not in ("none", "lp", "biht"):
            raise CodecError(f"{self.name}: recovery must be 'none', 'lp' or 'biht', got {recovery!r}")
        block = _pos_int("block", block, self.name, allow_none=True)
        if block is not None and block & (block - 1):
            raise CodecError(f"{self.name}: block must be a power of 2, got {block}")
        n = block if block is not None else 1 << (dim - 1).bit_length()
        blocks = -(-dim // n)
        k = max(1, measurements // blocks)
        if k > n:
            raise CodecError(f"{self.name}: measurements M={measurements} gives k={k} rows per block of length "
                             f"n={n}; use M <= {n * blocks}")
        if recovery == "lp" and n * k > LP_MAX_ENTRIES:
            raise CodecError(f"{self.name}: recovery='lp' needs block*k <= {LP_MAX_ENTRIES:.0e} (got n={n}, k={k}); "
                             "set block (e.g. 256) or use recovery='none'/'biht'")
        self.measurements, self.phi, self.recovery, self.block = measurements, phi, recovery, block
        self.n, self.blocks, self.k, self.m = n, blocks, k, blocks * k
        self.sparsity = _pos_int("sparsity", sparsity, self.name, allow_none=True) or max(1, self.m // 4)
        self.biht_iter = _pos_int("biht_iter", biht_iter, self.name)
        self.linear = phi == "common"  # instance attribute: shadows the class default False
        self._ops = SeedCache(self._build, size=8)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "measurements": self.measurements, "phi": self.phi, "recovery": self.recovery,
                "block": self.block, "sparsity": self.sparsity, "biht_iter": self.biht_iter}

    def nominal_bits(self) -> int:
        return self.m + 32

    # -- shared randomness --------------------------------------------------------------------------
    def _build(self, seed: int) -> PartialHadamard:
        return PartialHadamard(self.dim, self.k, seed=derive_seed(seed, "onebit_cs", "phi"), block=self.n,
                               signs=True)

    def operator(self, seed: int) -> PartialHadamard:
        """Phi for this seed (cached)."""
        return self._ops(_check_seed(seed, self.name))

    def dither(self, seed: int) -> torch.Tensor:
        """u ~ U(-1/2, 1/2)^m (float32) for this seed."""
        gen = torch_generator(_check_seed(seed, self.name), "onebit_cs", "dither")
        return torch.rand(self.m, generator=gen, dtype=torch.float32) - 0.5

    # -- codec --------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x).to(torch.float32)
        v = self.operator(seed).forward(x)
        rho = 2.0 * v.abs().max()
        if not torch.isfinite(rho):  # reject here, not at decode
            raise CodecError(f"{self.name}.encode: the measurement scale rho overflows float32 (|x| up to "
                             f"{float(x.abs().max()):.3g}); scale the update down")
        scaled = v / rho if rho > 0 else torch.zeros_like(v)
        q = (scaled + self.dither(seed) > 0).to(torch.uint8)  # 1 <-> +1, 0 <-> -1
        return Payload(codec=self.name, dim=self.dim, tensors={"q": q, "rho": rho.reshape(1).to(torch.float32)},
                       bits=self.nominal_bits())

    def _check_raw(self, payload: Payload) -> None:
        self.check_payload(payload, {"q": ((self.m,), torch.uint8), "rho": ((1,), torch.float32)})
        if bool((payload.tensors["q"] > 1).any()):
            raise PayloadError(f"{self.name}.decode: tensor 'q' must hold bits (0 or 1)")
        if float(payload.tensors["rho"][0]) < 0:
            raise PayloadError(f"{self.name}.decode: rho must be >= 0")

    def dequantize(self, payload: Payload, *, seed: int) -> torch.Tensor:
        """v_hat = rho (q/2 - u) (m,), or the aggregated sum of it."""
        if "v_sum" in payload.tensors:
            self._check_aggregated(payload)
            return payload.tensors["v_sum"] - payload.tensors["rho_sum"] * self.dither(seed)
        self._check_raw(payload)
        q = payload.tensors["q"].to(torch.float32) * 2.0 - 1.0
        return payload.tensors["rho"] * (0.5 * q - self.dither(seed))

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """phi="common" only: sum_i w_i v_hat_i = (sum_i w_i rho_i q_i / 2) - (sum_i w_i rho_i) u.

        Returned tensors: v_sum (m,) = sum_i w_i rho_i q_i / 2, rho_sum (1,) = sum_i w_i rho_i and
        rho_abs (1,) = sum_i |w_i| rho_i (the LP bound: |sum_i w_i e_i| <= rho_abs / 2). The dither
        term is removed at decode, which knows the seed. bits counts the float32 tensors (32 (m + 2)).
        """
        if not self.linear:
            raise CodecError(f"codec {self.name!r} with phi='per_worker' is not linear: decode each payload, "
                             "then average (or use phi='common')")
        payloads = list(payloads)
        w = _check_weights(self.name, payloads, weights)
        for p in payloads:
            self._check_raw(p)
        q = torch.stack([p.tensors["q"] for p in payloads]).to(torch.float32) * 2.0 - 1.0  # (C, m)
        rho = torch.cat([p.tensors["rho"] for p in payloads])  # (C,)
        v_sum = torch.tensordot(w * rho, 0.5 * q, dims=1)
        tensors = {"v_sum": v_sum, "rho_sum": (w * rho).sum().reshape(1), "rho_abs": (w.abs() * rho).sum().reshape(1)}
        return Payload(codec=self.name, dim=self.dim, tensors=tensors, bits=32 * (self.m + 2),
                       meta={"aggregated": len(payloads)})

    def _check_aggregated(self, payload: Payload) -> None:
        self.check_payload(payload, {"v_sum": ((self.m,), torch.float32), "rho_sum": ((1,), torch.float32),
                                     "rho_abs": ((1,), torch.float32)})

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        v_hat = self.dequantize(payload, seed=seed)
        op = self.operator(seed)
        if self.recovery == "none":
            return op.adjoint(v_hat).to(torch.float32)
        if "v_sum" in payload.tensors:
            half_width = 0.5 * float(payload.tensors["rho_abs"][0])
        else:
            half_width = 0.5 * float(payload.tensors["rho"][0])
        if half_width == 0.0:
            return torch.zeros(self.dim, dtype=torch.float32)
        if self.recovery == "lp":
            return self._recover_lp(op, v_hat, half_width)
        if "v_sum" in payload.tensors:
            # aggregated: the average of 1-bit measurements is multi-level, no longer a sign vector;
            # recover K-sparse from these real-valued measurements with FIHT instead
            return fiht(v_hat, op, self.sparsity, max_iter=self.biht_iter).to(torch.float32)
        # q = sign(Phi x + rho u): BIHT with the known dither recovers direction and norm
        q = payload.tensors["q"].to(torch.float32) * 2.0 - 1.0
        rho = payload.tensors["rho"]
        return biht(q, op, self.sparsity, max_iter=self.biht_iter, threshold=rho * self.dither(seed)).to(torch.float32)

    def _recover_lp(self, op: PartialHadamard, v_hat: torch.Tensor, half_width: float) -> torch.Tensor:
        """Eq. (6) per block b: min ||x_b||_1 s.t. |v_hat_b - T_b x_b|_i <= half_width (exact box)."""
        from scipy.linalg import hadamard

        h = torch.from_numpy(hadamard(self.n)).to(torch.float64)  # (n, n) +-1
        out = torch.zeros(self.blocks * self.n, dtype=torch.float64)
        signs = torch.ones(self.blocks * self.n, dtype=torch.float64)
        signs[: self.dim] = op.signs.to(torch.float64)
        v = v_hat.to(torch.float64).view(self.blocks, self.k)
        for b in range(self.blocks):
            lo = b * self.n
            cols = min(self.n, self.dim - lo)  # the last block may be zero padding past d
            a_b = h[op.rows[b]][:, :cols] * signs[lo : lo + cols] / math.sqrt(self.k)
            out[lo : lo + cols] = l1_recovery_lp(v[b], a_b, half_width)
        return out[: self.dim].to(torch.float32)
