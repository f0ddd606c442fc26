"""CompressedFedAvg: clients send an encoded update Δ_i (any registered codec) around any strategy.

Round (see fl_sim.clients.mods for the client half):

1. configure_train names the codec and its parameters and the round seed in the ConfigRecord; a codec
   that takes ``segments`` (per-tensor scales: qsgd, terngrad, sign, topk, qcs) gets the global model's
   floating-point tensor sizes there (:meth:`CompressedFedAvg.codec_params_for`), so the clients,
   which build their codec from these parameters, and the server quantize over the same tensors;
2. each client sends p_i = encode(Δ_i + EF residual) with its seeds (protocol.codec_seeds): the
   codec's common randomness from the round seed, its own randomness from (round seed, client id),
   independent across clients (``seed_mode="per_client"``, the default; "shared" is the old rule);
3. the server validates every payload against the codec's payload spec (tensor names, shapes,
   dtypes, finiteness), then either decodes each (the inner strategy gets w + decode(p_i)), or, for a
   linear codec (count_sketch, cs_fiht, rlc, onebit_cs with a common Φ), sums in the compressed domain
   (a codec with per-client dither removes each client's dither there) and decodes once
   (Δ̄ = decode(Σ_i (n_i/n) p_i); the inner gets w + Δ̄ from every client);
4. the inner strategy aggregates (FedAvg: the weighted mean; FedAdam: its server optimizer).

Baselines top-k + EF, QSGD, scaled sign and TernGrad are this strategy with the codec named in the
config. Client error feedback ("classic", [Karimireddy-2019]; "weighted", [Abdi-thesis] eq. 4.14) is
kept by ``compression_mod`` in the client's context.state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import Strategy

from fl_sim.wire import keys
from fl_sim.compression import Codec, Payload, Seeds
from fl_sim.wire.protocol import DEFAULT_SEED_MODE, check_seed_mode, codec_seeds, dump_params, get_codec
from fl_sim.wire.records import float_sizes, payload_from_records
from fl_sim.strategies import guards
from fl_sim.strategies.base import ClientReply, ReplyError, UpdateStrategy, payload_meta

__all__ = ["CompressedFedAvg", "EF_KINDS"]

EF_KINDS = ("none", "classic", "weighted")


class CompressedFedAvg(UpdateStrategy):
    """Compressed uplink around ``inner`` (a FedAvg with ``**kwargs`` when None).

    Args:
        inner: the strategy that aggregates the decoded models (FedAvg, FedAdam, FedProx...).
        codec: registry name (``fl_sim.compression.codec_names()``).
        codec_params: the codec's parameters (``make_codec(codec, dim=d, **codec_params)``).
        error_feedback: client memory: "none", "classic" (z = Δ + r, r ← z − ẑ) or "weighted"
            ([Abdi-thesis] eq. 4.14, forgetting factor ``ef_beta``).
        seed_mode: "per_client" (default): each client's own randomness (QCS rotations, rows and dither,
            QSGD/TernGrad rounding, random-k indices, 1-bit CS dither) is independent of the other
            clients', as the papers' workers are; only what a linear codec sums in the compressed
            domain (sensing matrix, hashes) is common. "shared": every client of a round uses the same
            randomness (fl-sim's earlier rule; correlated errors that averaging does not shrink).
        aggregate_compressed: sum linear codecs' payloads before one decode (default True).
        **kwargs: UpdateStrategy arguments (and FedAvg's, without an inner strategy).
    """

    USES_COMPRESSION_MOD = True

    def __init__(
        self,
        inner: Strategy | None = None,
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
        super().__init__(inner, **kwargs)
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
        self._params_with_segments: tuple[tuple[int, str], dict[str, Any]] | None = None

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "codec": self.codec_name, "codec_params": self.codec_params,
                "error_feedback": self.error_feedback, "seed_mode": self.seed_mode}

    # ---------------------------------------------------------------- codec on the server side
    def codec_params_for(self, dim: int) -> dict[str, Any]:
        """The codec parameters of this run: ``codec_params`` plus ``segments`` (the global model's
        floating-point tensor sizes in flatten order) when the codec takes them and none were given.

        Clients build their codec from these same parameters (CODEC_PARAMS in the round's config), so
        per-tensor scales agree on both sides. The model's shapes are fixed for a run: computed once per
        (dim, codec_params) (a subclass may change codec_params between rounds; methods sized by d
        override this and call it).
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

    @property
    def codec(self) -> Codec:
        """This round's codec (the global model's dimension)."""
        return self.codec_for(self.global_vector.numel())

    def client_seeds(self, cid: int) -> Seeds:
        """The seeds client ``cid`` encoded with this round (the same rule as compression_mod)."""
        return codec_seeds(self.round_seed, self.seed_mode, cid)

    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        params = self.codec_params_for(self.global_vector.numel())
        config[keys.CODEC] = self.codec_name
        config[keys.CODEC_PARAMS] = dump_params(params)
        config[keys.SEED] = self.round_seed
        config[keys.SEED_MODE] = self.seed_mode
        config[keys.EF] = self.error_feedback
        config[keys.EF_BETA] = self.ef_beta
        config[keys.EF_DTYPE] = self.ef_dtype

    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        meta = payload_meta(msg)
        if meta is None:
            raise ReplyError("reply carries no encoded payload (is compression_mod installed on the ClientApp?)")
        payload = payload_from_records(self.reply_arrays(msg), meta)
        codec = self.codec
        codec.validate_payload(payload)
        codec.check_values(payload)  # value checks of this one reply, before any aggregation
        # Bits counted by the server, never the client's claim: the codec's count of this payload's content
        # (variable-length codes), else those of the codec's own reference payload, whose structure
        # (names, shapes, dtypes: payload_spec) every accepted payload of a fixed-size codec has. The claim
        # is part of the payload, which a well-formed client computes exactly: one that differs is refused.
        counted = codec.payload_bits(payload)
        seeds = self.client_seeds(cid)  # the seed this reply is decoded with: its operator is built anyway
        bits = codec.reference_bits(seeds.seed if codec.seed_scope != "client" else seeds.own) \
            if counted is None else int(counted)
        if payload.bits != bits:
            raise ReplyError(f"payload claims {payload.bits} bits, its content takes {bits} (the server's count)")
        data: Any = payload
        if self.decodes_each():  # decoded here, once: the last per-reply check, and what combine averages
            vector = codec.decode_seeded(payload, seeds).to(torch.float32)
            if not guards.all_finite(vector):
                raise ReplyError("the payload decodes to NaN or inf")
            data = _Decoded(payload, vector)
        return data, bits

    def decodes_each_client(self) -> bool:
        return self.decodes_each()

    def decodes_each(self) -> bool:
        """Whether ``combine`` decodes every reply (else it sums the payloads in the compressed domain)."""
        codec = self.codec
        return not (codec.linear and self.aggregate_compressed)

    # reply guards (fl_sim.strategies.guards): ‖Δ̂_i‖ of a decoded reply; for payloads summed in the
    # compressed domain, decoding is linear in their float tensors (measurements, sketches, scales),
    # so those tensors' norm measures the reply and scaling them scales its decoded contribution.
    def reply_norm(self, reply: ClientReply) -> float | None:
        if isinstance(reply.data, _Decoded):
            return guards.tensor_norm([reply.data.vector])
        return guards.tensor_norm(_payload(reply.data).tensors.values())

    def scale_reply(self, reply: ClientReply, factor: float) -> None:
        if isinstance(reply.data, _Decoded):
            reply.data = _Decoded(reply.data.payload, reply.data.vector * factor)
            return
        p = _payload(reply.data)
        scaled = replace(p, tensors={k: (t.to(torch.float64) * factor).to(t.dtype) if torch.is_floating_point(t)
                                     else t for k, t in p.tensors.items()})
        reply.data = scaled if isinstance(reply.data, Payload) else (scaled, *reply.data[1:])

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        codec = self.codec
        if codec.linear and self.aggregate_compressed:  # common operator in both seed modes
            seeds = [self.client_seeds(r.cid) for r in replies]
            summed = codec.aggregate_seeded([_payload(r.data) for r in replies], weights.tolist(), seeds)
            return codec.decode_seeded(summed, Seeds(self.round_seed)).to(torch.float32)
        return torch.stack([r.data.vector if isinstance(r.data, _Decoded)  # decoded in decode_reply
                            else codec.decode_seeded(r.data, self.client_seeds(r.cid)).to(torch.float32)
                            for r in replies])

    @staticmethod
    def payload_tensor(payload: Payload) -> torch.Tensor:
        """The single tensor of a one-tensor payload (rlc's codeword, cs_fiht's measurements)."""
        (t,) = _payload(payload).tensors.values()
        return t


@dataclass(frozen=True)
class _Decoded:
    """A reply's payload with its decoded update Δ̂_i (strategies that decode every reply)."""

    payload: Payload
    vector: torch.Tensor


def _payload(data: Any) -> Payload:
    """The payload of a reply's data (a Payload, a _Decoded, or a tuple starting with a Payload)."""
    if isinstance(data, _Decoded):
        return data.payload
    return data if isinstance(data, Payload) else data[0]
