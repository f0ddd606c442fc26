"""CompressedFedAvg: FedAvg whose clients send an encoded update Δ_i (any registered codec).

Round (see fl_sim.clients.mods for the client half):

1. configure_train names the codec and its parameters and the round seed in the ConfigRecord; a codec
   that takes ``segments`` (per-tensor scales: qsgd, terngrad, sign, topk, qcs) gets the global model's
   floating-point tensor sizes there (:meth:`CompressedFedAvg.codec_params_for`), so the clients,
   which build their codec from these parameters, and the server quantize over the same tensors;
2. each client sends p_i = encode(Δ_i + EF residual) with its seeds (protocol.codec_seeds): the
   codec's common randomness from the round seed, its own randomness from (round seed, client id),
   independent across clients (``seed_mode="per_client"``, the default; "shared" is the old rule);
3. the server validates every payload against the codec's own structure (tensor names, shapes,
   dtypes, finiteness), then either decodes each and averages (Δ̄ = Σ_i (n_i/n) decode(p_i)), or,
   for a linear codec (count_sketch, cs_fiht, rlc, onebit_cs with a common Φ), sums in the compressed
   domain (a codec with per-client dither removes each client's dither there) and decodes once;
4. the server optimizer applies Δ̄ (η_s, μ of :class:`UpdateStrategy`).

Baselines top-k + EF, QSGD, scaled sign and TernGrad are this strategy with the codec named in the
config. Client error feedback ("classic", Karimireddy et al. 2019; "weighted", Abdi eq. 4.14) is
kept by ``compression_mod`` in the client's context.state.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Message

from .. import keys
from ..compression import Codec, Payload, PayloadError, Seeds
from ..protocol import DEFAULT_SEED_MODE, check_seed_mode, codec_seeds, dump_params, get_codec
from ..records import float_sizes, payload_from_records
from .base import ClientReply, ReplyError, UpdateStrategy

__all__ = ["CompressedFedAvg"]

EF_KINDS = ("none", "classic", "weighted")


class CompressedFedAvg(UpdateStrategy):
    """FedAvg over compressed updates.

    Args:
        codec: registry name (``fl_sim.compression.codec_names()``).
        codec_params: the codec's parameters (``make_codec(codec, dim=d, **codec_params)``).
        error_feedback: client memory: "none", "classic" (z = Δ + r, r ← z − ẑ) or "weighted"
            (Abdi eq. 4.14, forgetting factor ``ef_beta``).
        seed_mode: "per_client" (default): each client's own randomness (QCS rotations, rows and dither,
            QSGD/TernGrad rounding, random-k indices, 1-bit CS dither) is independent of the other
            clients', as the papers' workers are; only what a linear codec sums in the compressed
            domain (sensing matrix, hashes) is common. "shared": every client of a round uses the same
            randomness (fl-sim before issue 12; correlated errors that averaging does not shrink).
        aggregate_compressed: sum linear codecs' payloads before one decode (default True).
        **kwargs: UpdateStrategy / FedAvg arguments.
    """

    def __init__(
        self,
        *,
        codec: str = "identity",
        codec_params: dict[str, Any] | None = None,
        error_feedback: str = "none",
        ef_beta: float = 1.0,
        ef_dtype: str = "float32",
        seed_mode: str = DEFAULT_SEED_MODE,
        aggregate_compressed: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if error_feedback not in EF_KINDS:
            raise ValueError(f"error_feedback={error_feedback!r}: use one of {', '.join(EF_KINDS)}")
        check_seed_mode(seed_mode)
        if not 0 < ef_beta <= 1:
            raise ValueError(f"ef_beta={ef_beta}: the forgetting factor must be in (0, 1]")
        if ef_dtype not in ("float32", "float16"):
            raise ValueError(f"ef_dtype={ef_dtype!r}: use float32 or float16")
        self.codec_name = codec
        self.codec_params = dict(codec_params or {})
        self.error_feedback = error_feedback
        self.ef_beta = float(ef_beta)
        self.ef_dtype = ef_dtype
        self.seed_mode = seed_mode
        self.aggregate_compressed = aggregate_compressed
        self._reference: Payload | None = None
        self._params_with_segments: tuple[tuple[int, str], dict[str, Any]] | None = None

    # ---------------------------------------------------------------- codec on the server side
    def codec_params_for(self, dim: int) -> dict[str, Any]:
        """The codec parameters of this run: ``codec_params`` plus ``segments`` (the global model's
        floating-point tensor sizes in flatten order) when the codec takes them and none were given.

        Clients build their codec from these same parameters (CODEC_PARAMS in the round's config), so
        per-tensor scales agree on both sides. The model's shapes are fixed for a run: computed once per
        (dim, codec_params) (a subclass may change codec_params between rounds).
        """
        if "segments" in self.codec_params or self._global_arrays is None:
            return self.codec_params
        key = (dim, dump_params(self.codec_params))
        if self._params_with_segments is None or self._params_with_segments[0] != key:
            params = dict(self.codec_params)
            sizes = float_sizes(self._global_arrays)
            if sum(sizes) == dim and "segments" in get_codec(self.codec_name, dim, params).params():
                params["segments"] = sizes
            self._params_with_segments = (key, params)
        return self._params_with_segments[1]

    def codec_for(self, dim: int) -> Codec:
        return get_codec(self.codec_name, dim, self.codec_params_for(dim))

    def client_seeds(self, cid: int) -> Seeds:
        """The seeds client ``cid`` encoded with this round (the same rule as compression_mod)."""
        return codec_seeds(self._round_seed, self.seed_mode, cid)

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        config[keys.CODEC] = self.codec_name
        config[keys.CODEC_PARAMS] = dump_params(self.codec_params_for(self._global_vector.numel()))
        config[keys.SEED_MODE] = self.seed_mode
        config[keys.EF] = self.error_feedback
        config[keys.EF_BETA] = self.ef_beta
        config[keys.EF_DTYPE] = self.ef_dtype
        codec = self.codec_for(self._global_vector.numel())
        self._reference = codec.encode_seeded(torch.zeros(codec.dim), Seeds(self._round_seed))

    def check_payload(self, payload: Payload) -> None:
        """Structural check against a payload this codec itself made (same names/shapes/dtypes)."""
        ref = self._reference
        if payload.codec != ref.codec:
            raise PayloadError(f"payload made by codec {payload.codec!r}, expected {ref.codec!r}")
        if payload.dim != ref.dim:
            raise PayloadError(f"payload dim {payload.dim}, expected {ref.dim}")
        if set(payload.tensors) != set(ref.tensors):
            raise PayloadError(f"payload tensors {sorted(payload.tensors)}, expected {sorted(ref.tensors)}")
        for name, t in payload.tensors.items():
            r = ref.tensors[name]
            if tuple(t.shape) != tuple(r.shape) or t.dtype != r.dtype:
                raise PayloadError(
                    f"tensor {name!r} is {tuple(t.shape)} {t.dtype}, expected {tuple(r.shape)} {r.dtype}"
                )
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                raise PayloadError(f"tensor {name!r} contains NaN or inf")

    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        meta = msg.content.get(keys.PAYLOAD_META)
        arrays = msg.content.get(keys.ARRAYS)
        if meta is None or arrays is None:
            raise ReplyError("reply carries no encoded payload (is compression_mod installed on the ClientApp?)")
        payload = payload_from_records(arrays, meta)
        self.check_payload(payload)
        return payload, payload.bits

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codec = self.codec_for(self._global_vector.numel())
        if codec.linear and self.aggregate_compressed:  # common operator in both seed modes
            seeds = [self.client_seeds(r.cid) for r in replies]
            summed = codec.aggregate_seeded([r.data for r in replies], weights.tolist(), seeds)
            return codec.decode_seeded(summed, Seeds(self._round_seed)).to(torch.float32)
        decoded = []
        for r in replies:
            decoded.append(codec.decode_seeded(r.data, self.client_seeds(r.cid)).to(torch.float32))
        return weights.to(torch.float32) @ torch.stack(decoded)
