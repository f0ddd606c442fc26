"""Codecs ``qcs`` (quantized compressive sampling) and ``rlc`` (random linear coding) of the Abdi thesis.

Source: [Abdi-thesis], Ch. 4 (QCS: eqs. 4.1-4.12, Algorithm 2, Theorem 7,
Lemma 8) and Ch. 5 (RLC: eqs. 5.3-5.4, Lemma 13); docs/notes.md#qcs, #rlc and #qcs-1bit-erratum.

Both use the partial Hadamard operator of :mod:`fl_sim.compression.projections` (eq. 4.1 / 5.3),
rebuilt from the seed on both sides (signs R, row subset, dither u are never sent).

Randomness (fl_sim.compression.base, "Seeds"): QCS's R, S and u are all the client's own
(``seeding = "client"``: each worker quantizes independently in Ch. 4, so K clients' errors are
independent and their average has 1/K of one client's error); RLC's A is common to the round's
clients (``"common"``: the MAC sums A g_i, Ch. 5) and RLC has no per-client randomness.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.compression.base import Codec, CodecError, Payload, PayloadError, SeedCache, Seeds, check_seed, register_codec
from fl_sim.compression.projections import PartialHadamard, stacked_adjoint, stacked_forward
from fl_sim.compression.quantizers import (
    FLOAT_BITS,
    check_levels,
    dithered_bits,
    dithered_quantize,
    level_dtype,
    to_wire_float,
    uniform_dither,
)
from fl_sim.compression.transforms import next_pow2

__all__ = ["QCSCodec", "RLCCodec", "qcs_gamma", "GRANULARITIES"]

GRANULARITIES = ("tensor", "vector")

_THESIS_BLOCK = 256  # docs/notes.md#qcs-numbers: gain >= 32 at partition n = 256: k = 110, Q = 2 (gamma = 2.017)



def qcs_gamma(n: int, k: int, levels: float) -> float:
    """Theorem 7 eq. (4.10): gamma = n/k - 1 + (n / (4 Q^2)) ln(k)/(k - 1) for k >= 2; n - 1 for k = 1.

    n: block length, k: rows kept per block, Q = ``levels`` (Q = 1/2 for the 1-bit variant,
    docs/notes.md#qcs-1bit-erratum).
    Unbiased QCS has E||g - g_hat||^2 <= gamma ||g||^2. For k = 1 the thesis sends |v| and its sign
    exactly (proof of Thm 7, "v_hat = v and e_d = 0"), so only the projection error n - 1 remains.
    """
    if k == 1:
        return float(n - 1)
    return n / k - 1.0 + (n / (4.0 * levels**2)) * math.log(k) / (k - 1)


def _unit_if_needed(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(x / s, s) with s = ||x||_inf when x is outside [1e-30, 1e30] in magnitude, else (x, 1.0).

    Hadamard sums of up to 2^24 entries of size <= 1e30 stay far inside float32, and entries above 1e-30
    stay normal numbers, so the extra pass is only paid for extreme inputs.
    """
    s = float(x.abs().max()) if x.numel() else 0.0
    if 1e-30 <= s <= 1e30 or s == 0.0:
        return x, 1.0
    return x / s, s


def _apply_scaled(op_fn, x: torch.Tensor, who: str, what: str) -> torch.Tensor:
    """op_fn(x) for a linear op_fn, computed on x / ||x||_inf and scaled back in float64.

    Keeps the Hadamard sums in range for huge inputs and away from subnormals for tiny ones; the
    result is float32 (a value beyond float32 range raises CodecError).
    """
    t, s = _unit_if_needed(x)
    y = op_fn(t)
    return to_wire_float(y if s == 1.0 else y.to(torch.float64) * s, who, what)


def _unit_rows(X: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """:func:`_unit_if_needed` of every row of X (C, d): (rows scaled where needed, each row's s)."""
    peak = X.abs().amax(dim=-1).tolist() if X.numel() else [0.0] * X.shape[0]  # float(row.abs().max()), exact
    need = [i for i, s in enumerate(peak) if not (1e-30 <= s <= 1e30 or s == 0.0)]
    scales = [1.0] * X.shape[0]
    if need:
        X = X.clone()
        for i in need:  # extreme rows only: the very division of the one-vector path
            X[i], scales[i] = _unit_if_needed(X[i])
    return X, scales


@register_codec
class QCSCodec(Codec):
    """Quantized compressive sampling, blockwise ([Abdi-thesis] Ch. 4, Algorithm 2).

    The vector g (length d) is cut into B blocks g_b of length n (zero-padded), by ``granularity``:

    * "tensor" (default): every tensor of the model (``segments``: their lengths in flatten order) is
      zero-padded to whole blocks on its own, so no block straddles two tensors and each block's scale
      belongs to one layer: B = sum_i ceil(L_i / n). Abdi partitions the gradient "depending on the size
      of each layer's parameters" ([Abdi-thesis] Ch. 4 experiments; the partitions of QSGD's [15]
      buckets), i.e. per layer; with one segment (or without ``segments``) this is "vector".
    * "vector": the flattened update is zero-padded once, B = ceil(d / n) (fl-sim's earlier rule).

    Per block:

        v_b = T_b g_b,  T_b = (1/sqrt(k)) S_b H_n R_b                       (eqs. 4.1-4.2)
        rho_b = ||v_b||_inf / Q,  q_b = round(v_b / rho_b + u_b)  in {-Q..Q}  (eq. 4.4)
        v_hat_b = rho_b (q_b - u_b)                                          (eq. 4.6)
        g_hat_b = alpha T_b^T v_hat_b                                        (eq. 4.8)

    * H_n: n x n Sylvester Hadamard (+-1); R_b: diag of i.i.d. Rademacher signs; S_b: k random rows;
    * u_b ~ U(-1/2, 1/2)^k: subtractive dither, rebuilt from the seed at the decoder;
    * R, S and u are the client's own randomness (``seeding = "client"``): give every client its own seed
      (``Codec.encode_seeded`` does: derive_seed(round seed, "client", client id));
    * Q = ``levels``; Q = 0.5 selects the 1-bit variant (eq. 4.5): rho_b = 2 ||v_b||_inf,
      q_b = sign(v_b/rho_b + u_b) in {-1, +1}, and the unbiased v_hat_b = rho_b (q_b/2 - u_b)
      (ERRATUM, docs/notes.md#qcs-1bit-erratum: the printed rho (q - u) is biased by a factor 2);
    * k = 1: v_b is a scalar; its magnitude (the scale) and sign are sent, v_hat_b = v_b exactly
      (proof of Theorem 7), so no dither is subtracted;
    * alpha = 1 ("unbiased", eq. 4.9: E[g_hat] = g, E||g - g_hat||^2 <= gamma ||g||^2, Theorem 7) or
      alpha = 1/(gamma + 1) ("mmse", eq. 4.12: E||g - g_hat||^2 <= gamma/(gamma+1) ||g||^2, Lemma 8),
      gamma of eq. (4.10) (:func:`qcs_gamma`; for the zero-padded last block the bound still holds).

    Wire: per block one float32 scale ||v_b||_inf (rho_b = scale/Q is recomputed; same 32 bits as
    sending rho_b) and k fixed-length level indices of ceil(log2(2Q+1)) bits (1 bit when Q = 1/2):
    bits = B*32 + B*k*ceil(log2(2Q+1)), B of the granularity. The thesis counts k log2(2Q+1) and neglects the scale
    (eq. 4.11); :attr:`compression_gain` reports the thesis's figure, ``Payload.bits`` the exact one.

    Args:
        dim: d. block: n, a power of 2 (default min(next_pow2(d), 256)). k: rows per block, 1 <= k <= n
        (default round(110 n / 256), the gain-32 optimum at n = 256, docs/notes.md#qcs-numbers). levels: Q (default 2).
        alpha: "unbiased" or "mmse". granularity: "tensor" or "vector". segments: tensor lengths (sum = d;
        None: one tensor).
    """

    name = "qcs"
    seeding = "client"

    def __init__(
        self,
        *,
        dim: int,
        block: int | None = None,
        k: int | None = None,
        levels: float = 2,
        alpha: str = "unbiased",
        granularity: str = "tensor",
        segments: list[int] | None = None,
    ) -> None:
        super().__init__(dim=dim)
        if granularity not in GRANULARITIES:
            raise CodecError(f"qcs: granularity must be 'tensor' (blocks within each tensor) or 'vector', got {granularity!r}")
        if segments is not None:
            if (not isinstance(segments, (list, tuple)) or not segments
                    or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in segments)):
                raise CodecError(f"qcs: segments must be a list of positive tensor lengths, got {segments!r}")
            if sum(segments) != dim:
                raise CodecError(f"qcs: segments sum to {sum(segments)} but dim is {dim}; pass the model's tensor "
                                 "lengths in flatten order")
        if block is None:
            block = min(next_pow2(dim), _THESIS_BLOCK)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1 or block & (block - 1):
            raise CodecError(f"qcs: block must be a power of 2 (e.g. 256), got {block!r}")
        if k is None:
            k = max(1, round(110 * block / _THESIS_BLOCK))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= block:
            raise CodecError(f"qcs: k must be an int in 1..block={block}, got {k!r}; use a larger block or fewer rows")
        if alpha not in ("unbiased", "mmse"):
            raise CodecError(f"qcs: alpha must be 'unbiased' (eq. 4.9) or 'mmse' (eq. 4.12), got {alpha!r}")
        self.block, self.k, self.alpha = block, k, alpha
        self.granularity, self.segments = granularity, None if segments is None else [int(n) for n in segments]
        self.levels = check_levels(levels, "qcs")
        self._pos = self._layout()  # None: contiguous blocks of the flat vector; else x's position in the padded one
        self.blocks = -(-dim // block) if self._pos is None else self._padded // block
        op_dim = self.dim if self._pos is None else self._padded
        self._ops = SeedCache(lambda s: PartialHadamard(op_dim, self.k, seed=s, block=self.block))
        self._q_dtype = level_dtype(1 if self.levels == 0.5 else int(self.levels))

    # -- theory -----------------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        """Theorem 7 eq. (4.10) for this (n, k, Q)."""
        return qcs_gamma(self.block, self.k, self.levels)

    @property
    def alpha_value(self) -> float:
        """alpha of eq. (4.9) (= 1) or eq. (4.12) (= 1/(gamma + 1))."""
        return 1.0 if self.alpha == "unbiased" else 1.0 / (self.gamma + 1.0)

    @property
    def mse_bound(self) -> float:
        """Bound on E||g - g_hat||^2 / ||g||^2: gamma (Theorem 7) or gamma/(gamma+1) (Lemma 8)."""
        return self.gamma if self.alpha == "unbiased" else self.gamma / (self.gamma + 1.0)

    @property
    def compression_gain(self) -> float:
        """Eq. (4.11): 32 n / (k log2(2Q + 1)) (scale overhead neglected, as in the thesis)."""
        return FLOAT_BITS * self.block / (self.k * math.log2(2 * self.levels + 1))

    def params(self) -> dict:
        return {"dim": self.dim, "block": self.block, "k": self.k, "levels": self.levels, "alpha": self.alpha,
                "granularity": self.granularity, "segments": self.segments}

    # -- block layout -----------------------------------------------------------------------------
    def _layout(self) -> torch.Tensor | None:
        """Positions of x's entries in the tensor-aligned padded vector (None when that is x itself).

        Tensor i (length L_i, offset o_i in x) starts at block b_i = sum_{j<i} ceil(L_j / n); its entry
        o_i + t goes to b_i n + t. The layout equals the contiguous one (None) when every tensor but the
        last fills whole blocks, e.g. for one segment.
        """
        n = self.block
        if self.granularity == "vector" or self.segments is None or all(s % n == 0 for s in self.segments[:-1]):
            return None
        lengths = torch.tensor(self.segments, dtype=torch.int64)
        blocks = (lengths + n - 1) // n
        self._padded = int(blocks.sum()) * n
        seg = torch.repeat_interleave(torch.arange(len(self.segments)), lengths)  # tensor of each entry
        starts = torch.cumsum(lengths, 0) - lengths
        first_block = torch.cumsum(blocks, 0) - blocks
        return first_block[seg] * n + (torch.arange(self.dim) - starts[seg])

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self._pos is None:
            return x
        out = x.new_zeros(self._padded)
        out[self._pos] = x
        return out

    # -- the client's own randomness (seeding = "client") ---------------------------------------
    def _dither(self, seed: int) -> torch.Tensor:
        return uniform_dither((self.blocks, self.k), generator=torch_generator(seed, "qcs", "dither"))

    # -- contract ---------------------------------------------------------------------------------
    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"q": ((self.blocks, self.k), self._q_dtype), "scale": ((self.blocks,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        seed = check_seed(seed, "qcs.encode")
        op = self._ops(seed)
        # 1. v = T x blockwise, computed on x/||x||_inf (scale-free) ...
        t, s = _unit_if_needed(x)
        v = op.forward(self._pad(t)).view(self.blocks, self.k)
        # 2. ... dithered quantization per block, q and ||v_b||_inf
        q, vmax = dithered_quantize(v, self.levels, self._dither(seed))
        # 3. the true ||v_b||_inf = ||x||_inf * ||v'_b||_inf (one float32 per block)
        scale = to_wire_float(vmax * s, "qcs.encode", "the block scale ||v_b||_inf")
        bits = dithered_bits(self.blocks, self.k, self.levels)
        return Payload(self.name, self.dim, {"q": q, "scale": scale}, bits, {"levels": self.levels})

    # -- a cohort at once (Codec.encode_batch): one fwht over every client's blocks ------------------------
    def _pad_rows(self, X: torch.Tensor) -> torch.Tensor:
        if self._pos is None:
            return X
        out = X.new_zeros(X.shape[0], self._padded)
        out[:, self._pos] = X
        return out

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """Steps 1-3 of :meth:`encode` for every row of Z (C, d): client i's own T_i and dither u_i, one
        stacked transform (:func:`~fl_sim.compression.projections.stacked_forward`); bitwise ``encode``'s."""
        return self._encode_batch(Z, seeds)[0]

    def roundtrip_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> tuple[list[Payload], torch.Tensor]:
        """encode_batch and decode_batch with each client's T_i and dither built once for both."""
        payloads, ops, dither = self._encode_batch(Z, seeds)
        return payloads, self._decode_batch(payloads, ops, dither)

    def _encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]):
        Z, seeds = self._check_batch(Z, seeds)
        if not seeds:
            return [], [], None
        own = [check_seed(s, "qcs.encode") for s in self._own_seeds(seeds)]
        ops = [self._ops(s) for s in own]
        dither = torch.stack([self._dither(sd) for sd in own])
        T, s = _unit_rows(Z)
        v = stacked_forward(ops, self._pad_rows(T)).view(len(own), self.blocks, self.k)
        q, vmax = dithered_quantize(v, self.levels, dither)
        scale = to_wire_float(vmax * torch.tensor(s, dtype=torch.float64).unsqueeze(-1), "qcs.encode",
                              "the block scale ||v_b||_inf")
        bits = dithered_bits(self.blocks, self.k, self.levels)
        return [Payload(self.name, self.dim, {"q": q[i], "scale": scale[i]}, bits, {"levels": self.levels})
                for i in range(len(own))], ops, dither

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        """Steps 4-5 of :meth:`decode` for C payloads at once (one stacked adjoint); bitwise ``decode``'s rows."""
        payloads, seeds = self._check_decode_batch(payloads, seeds, validate=validate)
        if not payloads:
            return torch.zeros(0, self.dim)
        own = [check_seed(s, "qcs.decode") for s in self._own_seeds(seeds)]
        ops = [self._ops(s) for s in own]
        return self._decode_batch(payloads, ops, torch.stack([self._dither(sd) for sd in own]) if self.k > 1 else None)

    def _decode_batch(self, payloads: list[Payload], ops: list[PartialHadamard], dither) -> torch.Tensor:
        if not payloads:
            return torch.zeros(0, self.dim)
        q = torch.stack([p.tensors["q"] for p in payloads])
        scale = torch.stack([p.tensors["scale"] for p in payloads])
        code = q.to(torch.float32) * (0.5 if self.levels == 0.5 else 1.0)
        if self.k > 1:
            code = code - dither
        s_max = scale.amax(dim=-1).tolist()
        live = [i for i, m in enumerate(s_max) if m != 0.0]
        out = torch.zeros(len(payloads), self.dim, dtype=torch.float32)
        if not live:
            return out
        if len(live) < len(payloads):  # zero updates decode to zeros
            scale, code = scale[live], code[live]
        rel = scale.to(torch.float64) / torch.tensor([s_max[i] for i in live], dtype=torch.float64).unsqueeze(-1)
        y = code * rel.to(torch.float32).unsqueeze(-1)
        g = stacked_adjoint([ops[i] for i in live], y.reshape(len(live), -1))
        if self._pos is not None:
            g = g[:, self._pos]
        factor = torch.tensor([s_max[i] * self.alpha_value / self.levels for i in live], dtype=torch.float64)
        g = to_wire_float(g.to(torch.float64) * factor.unsqueeze(-1), "qcs.decode", "the decoded vector")
        if len(live) == len(payloads):
            return g
        out[live] = g
        return out

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self.check_payload(
            payload, self.payload_spec()
        )
        seed = check_seed(seed, "qcs.decode")
        self.check_values(payload)
        q, scale = payload.tensors["q"], payload.tensors["scale"]
        # 4. the code q - u (q/2 - u for 1 bit; no dither when k = 1), per block relative to the largest scale
        code = q.to(torch.float32) * (0.5 if self.levels == 0.5 else 1.0)
        if self.k > 1:
            code = code - self._dither(seed)
        s_max = float(scale.max())
        if s_max == 0.0:
            return torch.zeros(self.dim, dtype=torch.float32)
        y = code * (scale.to(torch.float64) / s_max).to(torch.float32).unsqueeze(-1)
        # 5. g_hat = alpha T^T v_hat, with v_hat_b = (scale_b / Q) code_b
        g = self._ops(seed).adjoint(y.reshape(-1))
        if self._pos is not None:
            g = g[self._pos]
        g = g.to(torch.float64) * (s_max * self.alpha_value / self.levels)
        return to_wire_float(g, "qcs.decode", "the decoded vector")

    def check_values(self, payload: Payload) -> None:
        """Scales finite and >= 0 (they are ||v_b||_inf); levels in {-Q..Q} ({-1, +1} for 1 bit)."""
        q, scale = payload.tensors.get("q"), payload.tensors.get("scale")
        if q is None or scale is None or tuple(q.shape) != (self.blocks, self.k) or tuple(scale.shape) != (self.blocks,):
            raise PayloadError(f"qcs: payload needs q {(self.blocks, self.k)} and scale {(self.blocks,)}")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise PayloadError("qcs.decode: tensor 'scale' must be finite and >= 0 (it is ||v_b||_inf)")
        if self.levels == 0.5:
            if not bool(((q == 1) | (q == -1)).all()):
                raise PayloadError("qcs.decode: 1-bit levels must be -1 or +1")
        elif int(q.abs().max()) > int(self.levels):
            raise PayloadError(f"qcs.decode: levels outside {{-{int(self.levels)}..{int(self.levels)}}}")


@register_codec
class RLCCodec(Codec):
    """Random linear coding for over-the-air aggregation, projection part ([Abdi-thesis] Ch. 5).

        y = A g,  A = (1/sqrt(m)) S H_n R                                    (eq. 5.3)
        g_hat = A^T y                                                        (eq. 5.4)

    * H_n: Sylvester Hadamard of size n = next_pow2(max(d, m)) (g zero-padded to n); R = diag of
      Rademacher signs; S: m random rows. A is common to all clients of a round (same seed).
    * Linear: the server sums the clients' y (weights alpha_i = n_i/n) and decodes once.
    * Lemma 13 (noise-free): E[g_hat] = g and E||g - g_hat||^2 = (n/m - 1) ||g||^2 over the random A
      (:attr:`mse_factor`; n = d when d is a power of 2, as in the thesis's (d/m - 1)).

    ``bits`` = 32 m for the digital view (m float32 values); over the air the payload is m channel
    uses (real symbols), counted by fl_sim.channels, whatever the number of clients.

    Args: dim: d. m: channel symbols (measurements), 1 <= m.
    """

    name = "rlc"
    linear = True
    seeding = "common"  # A is common to the round's clients (the MAC sums A g_i); no per-client randomness

    def __init__(self, *, dim: int, m: int | None = None) -> None:
        super().__init__(dim=dim)
        if m is None:
            m = max(1, dim // 20)  # the thesis's compression gain d/m = 20 (Fig. 5.3)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise CodecError(f"rlc: m must be a positive int (channel symbols per round), got {m!r}")
        self.m = m
        self.n = next_pow2(max(dim, m))
        self._ops = SeedCache(lambda s: PartialHadamard(self.dim, self.m, seed=s))

    @property
    def mse_factor(self) -> float:
        """Lemma 13: E||g - A^T A g||^2 / ||g||^2 = n/m - 1."""
        return self.n / self.m - 1.0

    @property
    def channel_uses(self) -> int:
        return self.m

    def params(self) -> dict:
        return {"dim": self.dim, "m": self.m}

    def operator(self, seed: int) -> PartialHadamard:
        """The round's A (cached per seed)."""
        return self._ops(check_seed(seed, "rlc.operator"))

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What one payload holds (tensor name -> (shape, dtype)); the server validates replies against it."""
        return {"y": ((self.m,), torch.float32)}

    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        x = self.check_input(x)
        y = _apply_scaled(self.operator(seed).forward, x, "rlc.encode", "A x")
        return Payload(self.name, self.dim, {"y": y}, FLOAT_BITS * self.m, {"channel_uses": self.m})

    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """A Z^T for the block Z (C, d) with the round's common A: one transform for every client."""
        Z, seeds = self._check_batch(Z, seeds)
        seed = self._common_seed(seeds)
        if not seeds or seed is None:  # rows of different rounds: one A each
            return super().encode_batch(Z, seeds)
        T, s = _unit_rows(Z)
        Y = self.operator(seed).forward(T)
        out = []
        for i, si in enumerate(s):
            y = to_wire_float(Y[i] if si == 1.0 else Y[i].to(torch.float64) * si, "rlc.encode", "A x")
            out.append(Payload(self.name, self.dim, {"y": y}, FLOAT_BITS * self.m, {"channel_uses": self.m}))
        return out

    def _check(self, payload: Payload) -> None:
        self.check_payload(payload, self.payload_spec())

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """y = sum_i w_i y_i (float64 accumulation); a fresh payload (the inputs are not modified)."""
        payloads = list(payloads)
        weights = [float(w) for w in weights]
        if not payloads or len(payloads) != len(weights):
            raise CodecError(f"rlc.aggregate: need one weight per payload, got {len(payloads)} payloads, {len(weights)} weights")
        if not all(math.isfinite(w) for w in weights):
            raise CodecError("rlc.aggregate: weights must be finite")
        for p in payloads:
            self._check(p)
        w = torch.tensor(weights, dtype=torch.float64)
        ys = torch.stack([p.tensors["y"].to(torch.float64) for p in payloads])
        y = to_wire_float(w @ ys, "rlc.aggregate", "the summed measurements")
        return Payload(self.name, self.dim, {"y": y}, FLOAT_BITS * self.m, {"channel_uses": self.m, "aggregated": len(payloads)})

    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        self._check(payload)
        return _apply_scaled(self.operator(seed).adjoint, payload.tensors["y"], "rlc.decode", "A^T y")

    def check_values(self, payload: Payload) -> None:
        """The codeword y = A g: finite float32 of length m (any real value is possible)."""
        y = payload.tensors.get("y")
        if y is None or tuple(y.shape) != (self.m,) or not torch.is_floating_point(y) or not bool(torch.isfinite(y).all()):
            raise PayloadError(f"rlc: payload needs a finite float tensor 'y' of shape ({self.m},)")
