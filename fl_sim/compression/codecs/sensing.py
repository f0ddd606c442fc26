"""Compressed-sensing codecs: ``cs_fiht`` (Tang et al.) and ``onebit_cs`` (Mitra & Khisti).

* ``cs_fiht``: [Tang-FIHT] (slides; docs/notes.md#tang-fiht): y = Phi x with
  Phi = sqrt(d/Q) (Q random rows of the DCT or WHT), recovery by FIHT (K-sparse).
* ``onebit_cs``: [Mitra-Khisti-2020] eqs. (4), (6), (9), (10) and the "same Phi"
  note (docs/notes.md#mitra-khisti), with the 1-bit dithered quantizer of [Abdi-thesis] eq. (4.5) in its
  unbiased form (App. A erratum, docs/notes.md#qcs-1bit-erratum): v_hat = rho_b (q/2 - u), rho_b = 2 ||v_b||_inf per block.

Randomness (fl_sim.compression.base, "Seeds"): cs_fiht's Phi is common (``seeding = "common"``, the
default of a linear codec); onebit_cs is "mixed": its Phi is common or per worker, its dither u is
always each client's own.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from fl_sim.rng import derive_seed, torch_generator
from fl_sim.compression.base import (
    Codec,
    CodecError,
    LinearOperator,
    Payload,
    PayloadError,
    SeedCache,
    Seeds,
    check_seed,
    client_round_seed,
    register_codec,
)
from fl_sim.compression.projections import PartialHadamard, SubsampledOrthogonal
from fl_sim.compression.recovery import LP_MAX_ENTRIES, biht, fast_operator, fiht, l1_recovery_lp

__all__ = ["CSFIHTCodec", "OneBitCSCodec", "PHI_SCHEDULES", "PHI_SEED_DEFAULT"]

PHI_SCHEDULES = ("fixed", "round")  # OneBitCS: Phi drawn once a priori (the paper) or redrawn every round
PHI_SEED_DEFAULT = derive_seed(0, "onebit_cs", "phi-a-priori")  # = OneBitCS(seed=0)'s fixed Phi


def _pos_int(name: str, value: Any, who: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CodecError(f"{who}: {name} must be a positive int, got {value!r}")
    return value



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

    Decoder: the modified FIHT of :func:`~fl_sim.compression.recovery.fiht` (sparsity continuation from
    ``start`` x Q nonzeros and the relative-decrease rule ``min_decrease``: two departures from the
    authors' FIHT.py, each an option; ``start=None, min_decrease=None`` is the reference schedule).

    Args:
        measurements: Q (1 <= Q <= n).  sparsity: K (default Q // 4, clipped to d).
        transform: "dct" or "wht".  max_iter: FIHT iterations.
        tol: relative residual ||y - Phi w|| / ||y|| at which FIHT stops (default 1e-6: the reference's
            precision on exactly sparse vectors, see ``fiht``).
        start: first sparsity level as a fraction of Q (default 1/128; None: K from the start, as FIHT.py).
        min_decrease: stop once the residual falls by less than this fraction per iteration (default 0.1;
            None: off, as FIHT.py).
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
        tol: float = 1e-6,
        start: float | None = 1 / 128,
        min_decrease: float | None = 0.1,
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
        if start is not None and (isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 < start <= 1):
            raise CodecError(f"{self.name}: start must be a fraction of Q in (0, 1] or None (K from the start), "
                             f"got {start!r}")
        if min_decrease is not None and (isinstance(min_decrease, bool) or not isinstance(min_decrease, (int, float))
                                         or not 0 <= min_decrease < 1):
            raise CodecError(f"{self.name}: min_decrease must be in [0, 1) or None (rule off), got {min_decrease!r}")
        self.start = None if start is None else float(start)
        self.min_decrease = None if min_decrease is None else float(min_decrease)
        self._ops = SeedCache(self._build)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "measurements": self.measurements, "sparsity": self.sparsity,
                "transform": self.transform, "max_iter": self.max_iter, "tol": self.tol, "start": self.start,
                "min_decrease": self.min_decrease}

    def nominal_bits(self) -> int:
        return 32 * self.measurements

    def _build(self, seed: int) -> tuple[LinearOperator, LinearOperator]:
        op = SubsampledOrthogonal(self.dim, self.measurements, seed=derive_seed(seed, "cs_fiht", "phi"),
                                  transform=self.transform)
        return op, fast_operator(op, torch.float32)

    def operator(self, seed: int) -> LinearOperator:
        """Phi for this seed (a SubsampledOrthogonal, cached)."""
        return self._ops(check_seed(seed, self.name))[0]

    def measure(self, x: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Phi x as float32 (Q,); x of shape (d,) or (C, d) -> (C, Q)."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
            raise CodecError(f"{self.name}.measure: expected a tensor of shape (d,) or (C, d)")
        if x.dim() == 1:
            x = self.check_input(x)
        elif x.shape[-1] != self.dim or not torch.is_floating_point(x) or not torch.isfinite(x).all():
            raise CodecError(f"{self.name}.measure: expected a finite float tensor of shape (C, {self.dim})")
        _, fast = self._ops(check_seed(seed, self.name))
        return fast.forward(x.to(torch.float32)).to(torch.float32)

    def recover(self, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """FIHT(y; Phi, K) as float32 (d,)."""
        op = self.operator(seed)
        return fiht(y.to(torch.float32), op, self.sparsity, max_iter=self.max_iter, tol=self.tol, start=self.start,
                    min_decrease=self.min_decrease).to(torch.float32)

    def _payload(self, y: torch.Tensor, meta: dict | None = None) -> Payload:
        return Payload(codec=self.name, dim=self.dim, tensors={"y": y}, bits=self.nominal_bits(), meta=meta or {})

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"y": ((self.measurements,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        y = self.measure(x, seed=seed)
        if not torch.isfinite(y).all():  # reject here, not at decode
            raise CodecError(f"{self.name}.encode: the measurements overflow float32 (|x| up to "
                             f"{float(x.abs().max()):.3g}); scale the update down")
        return self._payload(y)

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """Phi z_i for every row of Z (C, d) with the common Phi: one batched transform. Decode keeps the
        default loop (one FIHT recovery per payload is what ``decode`` is)."""
        Z, seeds = self._check_batch(Z, seeds)
        seed = self._common_seed(seeds)
        if not seeds or seed is None:  # rows of different rounds: one Phi each
            return super().encode_batch(Z, seeds)
        Y = self.measure(Z, seed=seed).contiguous()
        if not torch.isfinite(Y).all():
            raise CodecError(f"{self.name}.encode: the measurements overflow float32 (|x| up to "
                             f"{float(Z.abs().max()):.3g}); scale the update down")
        return [self._payload(Y[i]) for i in range(len(seeds))]

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Payload of sum_i w_i y_i = Phi (sum_i w_i x_i)."""
        payloads = list(payloads)
        w = _check_weights(self.name, payloads, weights)
        for p in payloads:
            self.check_values(p)
        y = torch.tensordot(w, torch.stack([p.tensors["y"] for p in payloads]), dims=1)
        return self._payload(y, {"aggregated": len(payloads)})

    def check_values(self, payload: Payload) -> None:
        """Raise PayloadError unless ``y`` holds Q finite float32 measurements (any finite value is possible)."""
        self.check_payload(payload, {"y": ((self.measurements,), torch.float32)})

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_values(payload)
        return self.recover(payload.tensors["y"], seed=seed)


# ------------------------------------------------------------------------------------------------
ONEBIT_RECOVERIES = ("none", "lp", "biht")  # 1-bit CS decoders: none (Φᵀy), LP, BIHT


@register_codec
class OneBitCSCodec(Codec):
    """1-bit quantized compressive sampling (Mitra & Khisti eq. 9) with an unbiased dithered quantizer.

    Encode (Phi and u from the seeds below):

        v = Phi x                 Phi = (1/sqrt(k)) S H_n R per block (PartialHadamard, [Abdi-thesis] eq. 4.1), m = B k rows
        rho_b = 2 ||v_b||_inf     one scale per block b = 1..B ([Abdi-thesis] eq. 4.5 applied per partition)
        q = sign(v_b / rho_b + u_b),  u ~ U(-1/2, 1/2)^m,  sign(t) = +1 if t > 0 else -1
        sent: q (m bits) and rho (32 bits per block)

    Dequantize (docs/notes.md#qcs-1bit-erratum: the printed v_hat = rho (q - u) is biased by a factor 2):

        v_hat_b = rho_b (q_b/2 - u_b),  v_hat - v uniform on [-rho_b/2, rho_b/2], independent of v:
        E[v_hat] = v,  Var[v_hat_i] = rho_b^2 / 12,  |v_hat_i - v_i| <= rho_b/2.

    Recover (``recovery``):
      * "none": x_hat = Phi^T v_hat, unbiased since E[Phi^T Phi] = I ([Abdi-thesis] Lemma 6, eq. 4.3); meant for
                M = d (one block row per coordinate); below d it is unbiased but noisy (n/k - 1 of Lemma 13);
      * "lp":   eq. (6) blockwise: min ||x_b||_1 s.t. |v_hat_b - Phi_b x_b| <= rho_b/2 per measurement
                (:func:`~fl_sim.compression.recovery.l1_recovery_lp`; the box is exact for this quantizer);
      * "biht": BIHT with the known dither threshold, q = sign(Phi x + rho u), which recovers the
                direction and the norm (:func:`~fl_sim.compression.recovery.biht`): the compressive regime
                M < d of the paper (sparse recovery, eq. 6's role). An aggregated payload (phi="common")
                is a weighted mean of dequantized measurements, no longer 1-bit: it is recovered K-sparse by
                FIHT on v_hat instead.

    Randomness (``seeding = "mixed"``; ``seed`` = the round's common seed, ``client_seed`` = the client's
    name, None for a single client):
      * the dither u is always the client's own, drawn anew every round: ``client_round_seed(seed,
        client_seed)``; with ``phi="common"`` too, so K clients' dither errors are independent and their
        average shrinks as 1/K (a shared u, fl-sim's earlier rule, made them identical);
      * Phi, ``phi="per_worker"`` (eqs. 9-10): Phi^(k) is worker k's own; ``phi="common"`` (the paper's
        "same Phi for all workers" note): one Phi for everybody, so the codec is linear in the
        dequantized domain (:meth:`aggregate`, one recovery);
      * Phi, ``phi_schedule="fixed"`` (the default, the paper's rule): fixed a priori for the whole run
        ("Phi^(k) known a priori", eq. 10 text): common Phi from ``phi_seed``, Phi^(k) from
        ``client_round_seed(phi_seed, client_seed)``; ``phi_seed`` None means :data:`PHI_SEED_DEFAULT`
        (the seed ``OneBitCS`` derives from run seed 0, so a bare codec and the strategy agree);
      * Phi, ``phi_schedule="round"`` (an option, not the paper's rule): redrawn every round, from
        ``seed`` (common) or ``client_round_seed(seed, client_seed)`` (per worker).

    Bits: m + 32 B (one bit per measurement, one float32 rho_b per block).

    Args:
        measurements: M; with ``block`` set, rounded down to a multiple of the B = ceil(d / block)
            blocks (k = M // B rows each, at least 1); m = B k is the actual count (``self.m``).
        phi: "per_worker" or "common".  recovery: "none", "lp" or "biht".
        block: power-of-2 block length n of the partial Hadamard (None: one block of next_pow2(d)).
        sparsity: K for BIHT / FIHT (default m // 4).  biht_iter: BIHT iterations.
        phi_schedule: "fixed" (Phi drawn once, from ``phi_seed``: the paper) or "round" (redrawn from each
            round's seed).
        phi_seed: the seed of the fixed Phi (None: :data:`PHI_SEED_DEFAULT`); only with "fixed".
    """

    name = "onebit_cs"
    seeding = "mixed"

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
        phi_schedule: str = "fixed",
        phi_seed: int | None = None,
    ) -> None:
        super().__init__(dim=dim)
        measurements = _pos_int("measurements", measurements, self.name)
        if phi_schedule not in PHI_SCHEDULES:
            raise CodecError(f"{self.name}: phi_schedule must be 'fixed' (the paper: Phi known a priori) or "
                             f"'round' (redrawn each round), got {phi_schedule!r}")
        if phi_schedule == "round" and phi_seed is not None:
            raise CodecError(f"{self.name}: phi_seed={phi_seed} fixes Phi, but phi_schedule='round' redraws it each "
                             "round; drop phi_seed or use phi_schedule='fixed'")
        if phi not in ("per_worker", "common"):
            raise CodecError(f"{self.name}: phi must be 'per_worker' or 'common', got {phi!r}")
        if recovery not in ONEBIT_RECOVERIES:
            raise CodecError(f"{self.name}: recovery must be 'none', 'lp' or 'biht', got {recovery!r}")
        block = _pos_int("block", block, self.name, allow_none=True)
        if block is not None and block & (block - 1):
            raise CodecError(f"{self.name}: block must be a power of 2, got {block}")
        if phi_schedule == "fixed":
            phi_seed = PHI_SEED_DEFAULT if phi_seed is None else check_seed(phi_seed, f"{self.name} (phi_seed)")
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
        self.phi_schedule, self.phi_seed = phi_schedule, phi_seed
        self.linear = phi == "common"  # instance attribute: shadows the class default False
        self._ops = SeedCache(self._build, size=16)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "measurements": self.measurements, "phi": self.phi, "recovery": self.recovery,
                "block": self.block, "sparsity": self.sparsity, "biht_iter": self.biht_iter, "phi_schedule": self.phi_schedule, "phi_seed": self.phi_seed}

    def nominal_bits(self) -> int:
        return self.m + 32 * self.blocks

    # -- randomness: Phi (common or per worker, fixed or per round) and the client's own dither ------
    def _build(self, seed: int) -> PartialHadamard:
        return PartialHadamard(self.dim, self.k, seed=derive_seed(seed, "onebit_cs", "phi"), block=self.n,
                               signs=True)

    def phi_key(self, seed: int, client_seed: int | None = None) -> int:
        """The seed Phi is built from (class docstring, "Randomness")."""
        base = check_seed(seed if self.phi_seed is None else self.phi_seed, self.name)
        return base if self.phi == "common" else client_round_seed(base, client_seed)

    def operator(self, seed: int, client_seed: int | None = None) -> PartialHadamard:
        """Phi of this client (cached)."""
        return self._ops(self.phi_key(seed, client_seed))

    def dither(self, seed: int, client_seed: int | None = None) -> torch.Tensor:
        """u ~ U(-1/2, 1/2)^m (float32): the client's own, new every round."""
        gen = torch_generator(client_round_seed(check_seed(seed, self.name), client_seed), "onebit_cs", "dither")
        return torch.rand(self.m, generator=gen, dtype=torch.float32) - 0.5

    def _per_entry(self, per_block: torch.Tensor) -> torch.Tensor:
        """(..., B) -> (..., m): each block's value repeated over its k measurements."""
        return per_block.repeat_interleave(self.k, dim=-1)

    # -- codec --------------------------------------------------------------------------------------
    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"q": ((self.m,), torch.uint8), "rho": ((self.blocks,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int, client_seed: int | None = None) -> Payload:
        x = self.check_input(x).to(torch.float32)
        v = self.operator(seed, client_seed).forward(x).view(self.blocks, self.k)
        rho = 2.0 * v.abs().amax(dim=1)  # (B,)
        if not torch.isfinite(rho).all():  # reject here, not at decode
            raise CodecError(f"{self.name}.encode: the measurement scale rho overflows float32 (|x| up to "
                             f"{float(x.abs().max()):.3g}); scale the update down")
        scaled = v / torch.where(rho > 0, rho, torch.ones_like(rho)).unsqueeze(1)
        q = (scaled.reshape(-1) + self.dither(seed, client_seed) > 0).to(torch.uint8)  # 1 <-> +1, 0 <-> -1
        return Payload(codec=self.name, dim=self.dim, tensors={"q": q, "rho": rho.to(torch.float32)},
                       bits=self.nominal_bits())

    def _check_raw(self, payload: Payload) -> None:
        self.check_payload(payload, self.payload_spec())
        self.check_values(payload)

    def _check_aggregated(self, payload: Payload) -> None:
        self.check_payload(payload, {"v_sum": ((self.m,), torch.float32), "rho_sum": ((self.blocks,), torch.float32),
                                     "rho_abs": ((self.blocks,), torch.float32)})
        self.check_values(payload)

    def check_values(self, payload: Payload) -> None:
        """q holds bits (0/1); rho (and an aggregate's rho_abs) finite and >= 0; v_sum, rho_sum finite."""
        t = payload.tensors
        if "v_sum" in t:
            for key, shape in (("v_sum", (self.m,)), ("rho_sum", (self.blocks,)), ("rho_abs", (self.blocks,))):
                if key not in t or tuple(t[key].shape) != shape or not bool(torch.isfinite(t[key]).all()):
                    raise PayloadError(f"{self.name}.decode: aggregated tensor {key!r} must be finite, shape {shape}")
            if bool((t["rho_abs"] < 0).any()):
                raise PayloadError(f"{self.name}.decode: rho_abs must be >= 0")
            return
        q, rho = t.get("q"), t.get("rho")
        if q is None or rho is None or tuple(q.shape) != (self.m,) or tuple(rho.shape) != (self.blocks,):
            raise PayloadError(f"{self.name}.decode: payload needs q ({self.m},) and rho ({self.blocks},)")
        if bool((q > 1).any()) or bool((q < 0).any()):
            raise PayloadError(f"{self.name}.decode: tensor 'q' must hold bits (0 or 1)")
        if not bool(torch.isfinite(rho).all()) or bool((rho < 0).any()):
            raise PayloadError(f"{self.name}.decode: rho must be finite and >= 0 (it is 2 ||v_b||_inf)")

    def dequantize(self, payload: Payload, *, seed: int, client_seed: int | None = None) -> torch.Tensor:
        """v_hat = rho_b (q/2 - u) (m,), or the aggregated sum of it."""
        if "v_sum" in payload.tensors:
            self._check_aggregated(payload)
            rho_sum = payload.tensors["rho_sum"]
            if not bool((rho_sum != 0).any()):
                return payload.tensors["v_sum"]
            return payload.tensors["v_sum"] - self._per_entry(rho_sum) * self.dither(seed, client_seed)
        self._check_raw(payload)
        q = payload.tensors["q"].to(torch.float32) * 2.0 - 1.0
        return self._per_entry(payload.tensors["rho"]) * (0.5 * q - self.dither(seed, client_seed))

    def aggregate(
        self,
        payloads: Sequence[Payload],
        weights: Sequence[float],
        *,
        seed: int | None = None,
        client_seeds: Sequence[int | None] | None = None,
    ) -> Payload:
        """phi="common" only: sum_i w_i v_hat_i, each client's own dither removed.

        Payload i was encoded with ``Seeds(seed, client_seeds[i])``: its dither u_i is known to the server,
        so v_sum = sum_i w_i rho_i (q_i/2 - u_i) directly. A payload whose client seed is None (a single
        client, or ``seed_mode="shared"``) used the dither of ``seed`` alone; its part w_i rho_i u is left
        to decode (rho_sum, per block), which knows the seed. ``client_seeds=None``: all of them so.
        rho_abs (B,) = sum_i |w_i| rho_i (the LP box: |sum_i w_i e_i| <= rho_abs / 2 per block).
        bits counts the float32 tensors (32 (m + 2B)).
        """
        if not self.linear:
            raise CodecError(f"codec {self.name!r} with phi='per_worker' is not linear: decode each payload, "
                             "then average (or use phi='common')")
        payloads = list(payloads)
        w = _check_weights(self.name, payloads, weights)
        clients = [None] * len(payloads) if client_seeds is None else list(client_seeds)
        if len(clients) != len(payloads):
            raise CodecError(f"{self.name}.aggregate: {len(payloads)} payloads but {len(clients)} client seeds")
        own = [j for j, c in enumerate(clients) if c is not None]
        if own and seed is None:
            raise CodecError(f"{self.name}.aggregate: client_seeds need the round's seed (seed=...)")
        for p in payloads:
            self._check_raw(p)
        code = torch.stack([p.tensors["q"] for p in payloads]).to(torch.float32) - 0.5  # q/2 in {-1/2, +1/2}
        if own:
            u = torch.stack([self.dither(seed, clients[j]) for j in own])
            code[own] -= u
        rho = torch.stack([p.tensors["rho"] for p in payloads])  # (C, B)
        v_sum = torch.tensordot(w, self._per_entry(rho) * code, dims=1)
        shared = torch.tensor([c is None for c in clients], dtype=torch.float32)
        tensors = {"v_sum": v_sum, "rho_sum": torch.tensordot(w * shared, rho, dims=1),
                   "rho_abs": torch.tensordot(w.abs(), rho, dims=1)}
        return Payload(codec=self.name, dim=self.dim, tensors=tensors, bits=32 * (self.m + 2 * self.blocks),
                       meta={"aggregated": len(payloads)})

    def decode(self, payload: Payload, *, seed: int, client_seed: int | None = None) -> torch.Tensor:
        v_hat = self.dequantize(payload, seed=seed, client_seed=client_seed)
        op = self.operator(seed, client_seed)
        if self.recovery == "none":
            return op.adjoint(v_hat).to(torch.float32)
        aggregated = "v_sum" in payload.tensors
        half_width = 0.5 * payload.tensors["rho_abs" if aggregated else "rho"]  # (B,)
        if not bool((half_width > 0).any()):
            return torch.zeros(self.dim, dtype=torch.float32)
        if self.recovery == "lp":
            return self._recover_lp(op, v_hat, half_width)
        if aggregated:
            # the average of 1-bit measurements is multi-level, no longer a sign vector;
            # recover K-sparse from these real-valued measurements with FIHT instead
            return fiht(v_hat, op, self.sparsity, max_iter=self.biht_iter).to(torch.float32)
        # q = sign(Phi_b x_b / rho_b + u_b) = sign(D Phi z + u) with z = x / max_b rho_b and
        # D = diag(max rho / rho_b): BIHT with the known dither u on the block-scaled operator D Phi
        # recovers direction and norm of z at unit scale; every block's measurements count alike whatever
        # its scale. A block with rho_b = 0 (or below 1e-20 max rho) gets D = 0: its q = sign(u) holds for
        # any x and carries nothing.
        q = payload.tensors["q"].to(torch.float32) * 2.0 - 1.0
        rho = payload.tensors["rho"].to(torch.float64)
        top = float(rho.max())
        ratio = torch.where(rho > 1e-20 * top, top / rho.clamp(min=1e-300), 0.0).to(torch.float32)
        z = biht(q, _RowScaled(op, self._per_entry(ratio)), self.sparsity, max_iter=self.biht_iter,
                 threshold=self.dither(seed, client_seed))
        return (z.to(torch.float64) * top).to(torch.float32)

    def _recover_lp(self, op: PartialHadamard, v_hat: torch.Tensor, half_width: torch.Tensor) -> torch.Tensor:
        """Eq. (6) per block b: min ||x_b||_1 s.t. |v_hat_b - T_b x_b|_i <= half_width_b (exact box)."""
        from scipy.linalg import hadamard

        h = torch.from_numpy(hadamard(self.n)).to(torch.float64)  # (n, n) +-1
        out = torch.zeros(self.blocks * self.n, dtype=torch.float64)
        signs = torch.ones(self.blocks * self.n, dtype=torch.float64)
        signs[: self.dim] = op.signs.to(torch.float64)
        v = v_hat.to(torch.float64).view(self.blocks, self.k)
        for b in range(self.blocks):  # one LP per block (scipy); a zero-scale block is exactly zero
            width = float(half_width[b])
            if width == 0.0:
                continue
            lo = b * self.n
            cols = min(self.n, self.dim - lo)  # the last block may be zero padding past d
            a_b = h[op.rows[b]][:, :cols] * signs[lo : lo + cols] / math.sqrt(self.k)
            out[lo : lo + cols] = l1_recovery_lp(v[b], a_b, width)
        return out[: self.dim].to(torch.float32)


class _RowScaled(LinearOperator):
    """D A for a diagonal D (``scale``, (m,)): the measurements of A, each row scaled."""

    def __init__(self, op: LinearOperator, scale: torch.Tensor) -> None:
        self.op, self.scale = op, scale
        self.m, self.d = op.m, op.d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op.forward(x)
        return y * self.scale.to(y.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.adjoint(y * self.scale.to(y.dtype))
