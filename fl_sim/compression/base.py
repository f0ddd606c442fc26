"""Codec contract: ``encode(x, seed) -> Payload`` and ``decode(payload, seed) -> x_hat``.

A codec turns a flat float vector of length ``dim`` (a model update) into a :class:`Payload`, the
exact content that would cross the wire, and back. ``Payload.bits`` is an exact integer count of
every bit sent: values, indices, norms and scales alike. Randomness (signs, row subsets, hashes,
dither) is rebuilt from seeds on both sides and never sent.

Seeds: common and per-client randomness. In a round of federated learning some random parts
must be the same on every client (a sensing matrix or hash family that is summed in the compressed
domain: :attr:`Codec.linear` codecs) and the rest is each client's own, independent of the others (the
papers' workers quantize independently; a shared dither makes the clients' errors identical, so
averaging K clients no longer divides the error by K). A round is described by :class:`Seeds`:

* ``seed``: the round's common seed (the same for all clients);
* ``client``: an int that names the client for the whole run (fl-sim passes the client id), or None
  for a single client (a library user's ``encode(x, seed=s)``) and for the legacy ``seed_mode="shared"``.

A client's own randomness in the round comes from ``client_round_seed(seed, client)``
(``derive_seed(seed, "client", client)``; ``seed`` itself when ``client`` is None). Each codec says in
:attr:`Codec.seeding` which kind of randomness it has and documents its parts:

* ``"client"``: all of it is the client's own (QCS, QSGD, TernGrad, random-k): ``encode(x, seed=...)``
  takes one seed, the client's own (``Codec.encode_seeded`` passes ``client_round_seed``);
* ``"common"``: all of it is common (Count Sketch hashes, FIHT-CS's Phi, RLC's A): ``seed`` only;
* ``"mixed"``: both (1-bit CS: a common or per-worker Phi and each client's own dither):
  ``encode(x, *, seed, client_seed=None)`` and ``decode(payload, *, seed, client_seed=None)``.

Default: "common" for a linear codec, "client" otherwise. Strategies and client mods call
:meth:`Codec.encode_seeded`, :meth:`Codec.decode_seeded` and :meth:`Codec.aggregate_seeded`, which
apply this rule, so every codec is driven the same way; ``encode(x, seed=s)`` alone keeps working.

Linear codecs (``linear = True``) also implement :meth:`Codec.aggregate`: payloads are summed in the
compressed domain (sketches, measurements) so a server recovers once from the sum.

No flwr import in this package: Flower glue converts ``Payload.tensors`` to an ArrayRecord.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from fl_sim.rng import derive_seed

__all__ = [
    "Seeds",
    "SEEDINGS",
    "check_seed",
    "client_round_seed",
    "SeedCache",
    "Payload",
    "Codec",
    "CodecError",
    "PayloadError",
    "register_codec",
    "make_codec",
    "codec_names",
    "check_vector",
    "check_seed",
    "bits_for_index",
    "LinearOperator",
    "DenseOperator",
]


class CodecError(ValueError):
    """Bad codec construction or input (unknown parameter, wrong dimension, NaN input)."""


class PayloadError(ValueError):
    """A payload that cannot be decoded (wrong codec, shape, dtype, non-finite values)."""


SEEDINGS = ("client", "common", "mixed")


def check_seed(seed: object, who: str) -> int:
    """``seed`` if it is an int (not a bool), else a one-line CodecError naming ``who``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CodecError(f"{who}: seed must be an int (fl_sim.rng.derive_seed gives one), got {seed!r}")
    return seed


def client_round_seed(seed: int, client: int | None) -> int:
    """The seed of one client's own randomness in the round of ``seed`` (``seed`` itself when client is None)."""
    seed = check_seed(seed, "client_round_seed")
    if client is None:
        return seed
    return derive_seed(seed, "client", check_seed(client, "client_round_seed (client)"))


@dataclass(frozen=True)
class Seeds:
    """The seeds of one client in one round: ``seed`` common to the round, ``client`` the client's name.

    ``client=None``: a single client, or the legacy ``seed_mode="shared"`` in which every client of a
    round draws the same randomness. :attr:`own` is the seed of the client's own randomness this round.
    """

    seed: int
    client: int | None = None

    @property
    def own(self) -> int:
        return client_round_seed(self.seed, self.client)


class SeedCache:
    """A small LRU of objects built from a seed: sensing operators, Hadamard signs and rows, sketch hashes.

    Building one costs O(d) or more, and a round reuses one shared seed for every client's encode and
    the server's decode: with this cache the work is done once per round and process, not once per client.
    ``size``: how many seeds are kept (a round needs one; a few more cover overlapping rounds).
    """

    def __init__(self, build: Callable[[int], Any], size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"SeedCache size={size}: must be >= 1")
        self.build, self.size = build, int(size)
        self.items: OrderedDict[int, Any] = OrderedDict()

    def __call__(self, seed: int) -> Any:
        if seed in self.items:
            self.items.move_to_end(seed)
            return self.items[seed]
        value = self.build(seed)
        self.items[seed] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


@dataclass(frozen=True)
class Payload:
    """What crosses the wire for one encoded vector.

    Attributes:
        codec: registry name of the codec that made it.
        dim: length of the original vector.
        tensors: named tensors that are sent (indices, values, quantized levels, measurements).
        bits: exact number of bits sent, headers (norms, scales, indices) included.
        meta: small scalars that travel with it (already counted in ``bits`` when they are sent).
    """

    codec: str
    dim: int
    tensors: dict[str, torch.Tensor]
    bits: int
    meta: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits < 0:
            raise PayloadError(f"Payload.bits must be a non-negative int, got {self.bits!r}")


def check_vector(x: torch.Tensor, dim: int, who: str) -> torch.Tensor:
    """Validate an input vector and return it as contiguous float32 (float64 kept as float64).

    Raises CodecError naming the problem: not a tensor, wrong shape, integer dtype, NaN/inf.
    """
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.numel() != dim:
        raise CodecError(
            f"{who}: expected a 1-D tensor of length {dim}, got shape {tuple(x.shape)}; "
            "flatten the update (torch.cat([p.flatten() for p in params])) or build the codec with the right dim"
        )
    return _finite_float(x, who)


def _finite_float(x: torch.Tensor, who: str) -> torch.Tensor:
    """``x`` checked floating and finite (CodecError naming ``who``), as contiguous float32 (float64 kept)."""
    if not torch.is_floating_point(x):
        raise CodecError(f"{who}: expected a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise CodecError(f"{who}: input contains NaN or inf; check the learning rate / loss before compressing")
    if x.dtype != torch.float64:
        x = x.to(torch.float32)
    return x.contiguous()


class Codec(ABC):
    """Base class of every codec. Subclasses set ``name`` and implement encode/decode.

    Construction: ``Codec(dim=d, **params)``; parameters are keyword-only and validated.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = False
    #: "client", "common" or "mixed" (module docstring); None: "common" if linear else "client".
    seeding: ClassVar[str | None] = None

    def __init__(self, *, dim: int) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise CodecError(f"{self.name}: dim must be a positive int, got {dim!r}")
        self.dim = dim

    # -- contract -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: torch.Tensor, *, seed: int) -> Payload:
        """Compress ``x`` (shape ``(dim,)``) with shared randomness from ``seed``."""

    @abstractmethod
    def decode(self, payload: Payload, *, seed: int) -> torch.Tensor:
        """Reconstruct a float32 vector of shape ``(dim,)`` from a payload (same ``seed``)."""

    def payload_bits(self, payload: Payload) -> int | None:
        """Bits of a received payload counted by the receiver from its content with this codec's coding
        (never ``payload.bits``, the sender's claim). None (default): a fixed-size codec, every
        well-formed payload of which has the bits of the receiver's own reference payload. A codec whose
        size depends on the data (variable-length codes) overrides this."""
        return None

    def aggregate(self, payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
        """Weighted sum in the compressed domain (linear codecs only)."""
        raise CodecError(f"codec {self.name!r} is not linear: decode each payload, then average")

    def nominal_bits(self) -> int:
        """Bits of one payload as the theory counts them (for ratios and config checks)."""
        return self.encode(torch.zeros(self.dim), seed=0).bits

    def check_values(self, payload: Payload) -> None:
        """Raise PayloadError for values no well-formed payload of this codec can hold (levels out of
        range, negative or non-finite scales). Cheap (vectorized); structure is checked elsewhere.
        Default: no value constraint beyond the structural check."""

    # -- seeds: common and per-client randomness (module docstring) -----------------------------------
    @property
    def seed_scope(self) -> str:
        """This codec's :attr:`seeding`, with the default filled in."""
        scope = self.seeding or ("common" if self.linear else "client")
        if scope not in SEEDINGS:
            raise CodecError(f"{self.name}: seeding={scope!r}; use one of {', '.join(SEEDINGS)}")
        return scope

    def _seed_kwargs(self, seeds: Seeds) -> dict[str, Any]:
        scope = self.seed_scope
        if scope == "mixed":
            return {"seed": seeds.seed, "client_seed": seeds.client}
        return {"seed": seeds.own if scope == "client" else seeds.seed}

    def encode_seeded(self, x: torch.Tensor, seeds: Seeds) -> Payload:
        """encode(x) as client ``seeds.client`` of the round ``seeds.seed`` (common and own randomness)."""
        return self.encode(x, **self._seed_kwargs(seeds))

    def decode_seeded(self, payload: Payload, seeds: Seeds) -> torch.Tensor:
        """decode(payload) of client ``seeds.client`` (or of an aggregate: ``Seeds(seed)``)."""
        return self.decode(payload, **self._seed_kwargs(seeds))

    # -- a cohort at once (fl_sim.clients.cohort_encode) -----------------------------------------------
    def encode_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> list[Payload]:
        """``[encode_seeded(Z[i], seeds[i]) for i]`` for a block Z (C, dim) of C clients' vectors.

        Default: that loop, so every codec supports it. A codec overrides it with tensor ops over the
        whole block (one transform, one quantization), drawing each client's own random numbers from its
        own generator; an override's payloads are bitwise those of the loop (tests/test_batched_encoding.py).
        """
        Z, seeds = self._check_batch(Z, seeds)
        return [self.encode_seeded(Z[i], s) for i, s in enumerate(seeds)]

    def decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *, validate: bool = True) -> torch.Tensor:
        """``torch.stack([decode_seeded(p_i, seeds[i]) for i])``: (C, dim) float32.

        ``validate=False``: the caller made the payloads itself (a client's error-feedback update right
        after :meth:`encode_batch`), so an override may skip the received-payload checks; the values are
        the same. The default loop always validates.
        """
        payloads, seeds = self._check_decode_batch(payloads, seeds)
        if not payloads:
            return torch.zeros(0, self.dim)
        return torch.stack([self.decode_seeded(p, s) for p, s in zip(payloads, seeds)])

    def roundtrip_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> tuple[list[Payload], torch.Tensor]:
        """(encode_batch(Z, seeds), decode_batch of those payloads): what a client's error feedback needs.

        A codec whose per-client randomness is costly to rebuild (QCS's operators) overrides it to build
        each client's once for both directions."""
        payloads = self.encode_batch(Z, seeds)
        return payloads, self.decode_batch(payloads, seeds, validate=False)

    def _check_batch(self, Z: torch.Tensor, seeds: Sequence[Seeds]) -> tuple[torch.Tensor, list[Seeds]]:
        """Z as a (C, dim) floating tensor (float32 unless float64) and one Seeds per row; CodecError otherwise.

        Rows are checked as :func:`check_vector` checks one vector (finite, floating).
        """
        seeds = list(seeds)
        who = f"{self.name}.encode_batch"
        if not isinstance(Z, torch.Tensor) or Z.dim() != 2 or Z.shape[1] != self.dim:
            shape = tuple(Z.shape) if isinstance(Z, torch.Tensor) else type(Z).__name__
            raise CodecError(f"{who}: expected a (C, {self.dim}) tensor, got {shape}")
        if Z.shape[0] != len(seeds):
            raise CodecError(f"{who}: {Z.shape[0]} rows but {len(seeds)} seeds")
        return _finite_float(Z, who), seeds

    def _check_decode_batch(self, payloads: Sequence[Payload], seeds: Sequence[Seeds], *,
                            validate: bool = False) -> tuple[list[Payload], list[Seeds]]:
        """(payloads, seeds) as lists of one length (CodecError otherwise); with ``validate``, each payload
        checked as ``decode`` checks a received one (``check_payload`` against the spec, ``check_values``)."""
        payloads, seeds = list(payloads), list(seeds)
        if len(payloads) != len(seeds):
            raise CodecError(f"{self.name}.decode_batch: {len(payloads)} payloads but {len(seeds)} seeds")
        if validate:
            for p in payloads:
                self.check_payload(p, self.payload_spec())
                self.check_values(p)
        return payloads, seeds

    def _own_seeds(self, seeds: Sequence[Seeds]) -> list[int]:
        """Each client's encode seed for a ``seeding = "client"`` codec (what encode_seeded passes)."""
        return [s.own for s in seeds]

    def _common_seed(self, seeds: Sequence[Seeds]) -> int | None:
        """The one common seed of a ``seeding = "common"`` batch, None when the rows' seeds differ."""
        common = {s.seed for s in seeds}
        return common.pop() if len(common) == 1 else None

    def aggregate_seeded(self, payloads: Sequence[Payload], weights: Sequence[float], seeds: Sequence[Seeds]) -> Payload:
        """aggregate(payloads, weights) where payload i was encoded with ``seeds[i]``.

        A "mixed" linear codec gets the round seed and the clients' names (to remove each client's own
        dither); the others have only common randomness and sum the payloads as they are.
        Decode the result with ``decode_seeded(summed, Seeds(seed))``.
        """
        seeds = list(seeds)
        if len(seeds) != len(payloads):
            raise CodecError(f"{self.name}.aggregate: {len(payloads)} payloads but {len(seeds)} seeds")
        if self.seed_scope != "mixed":
            return self.aggregate(payloads, weights)
        if len({s.seed for s in seeds}) > 1:
            raise CodecError(f"{self.name}.aggregate: payloads of different rounds (common seeds differ)")
        return self.aggregate(payloads, weights, seed=seeds[0].seed if seeds else 0,
                              client_seeds=[s.client for s in seeds])

    # -- helpers for subclasses -----------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return check_vector(x, self.dim, f"{self.name}.encode")

    def check_payload(self, payload: Payload, expected: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        """Validate a received payload: codec name, dim, tensor names, shapes, dtypes, finiteness.

        ``expected`` maps tensor name -> (shape, dtype or None for 'any floating').
        """
        if not isinstance(payload, Payload):
            raise PayloadError(f"{self.name}.decode: expected a Payload, got {type(payload).__name__}")
        if payload.codec != self.name:
            raise PayloadError(f"{self.name}.decode: payload was made by codec {payload.codec!r}")
        if payload.dim != self.dim:
            raise PayloadError(f"{self.name}.decode: payload dim {payload.dim} != codec dim {self.dim}")
        missing = set(expected) - set(payload.tensors)
        if missing:
            raise PayloadError(f"{self.name}.decode: payload lacks tensors {sorted(missing)}")
        for key, (shape, dtype) in expected.items():
            t = payload.tensors[key]
            if tuple(t.shape) != tuple(shape):
                raise PayloadError(
                    f"{self.name}.decode: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                )
            if dtype is not None and t.dtype != dtype:
                raise PayloadError(f"{self.name}.decode: tensor {key!r} has dtype {t.dtype}, expected {dtype}")
            if torch.is_floating_point(t) and not torch.isfinite(t).all():
                raise PayloadError(f"{self.name}.decode: tensor {key!r} contains NaN or inf")

    def payload_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """What one payload of this codec holds: tensor name -> (shape, dtype).

        A codec may declare it; the default reads it once from an encoding of the zero vector (cached
        on the codec, which the server keeps per round: no encoding per round or per reply).
        """
        spec = self.__dict__.get("_payload_spec")
        if spec is None:
            ref = self.encode(torch.zeros(self.dim), seed=0)
            spec = {k: (tuple(t.shape), t.dtype) for k, t in ref.tensors.items()}
            self.__dict__["_payload_spec"] = spec
        return spec

    def reference_bits(self, seed: int = 0) -> int:
        """Bits of this codec's own reference payload (an encoding of the zero vector, cached like
        :meth:`payload_spec`): what the receiver counts for a well-formed payload of a fixed-size codec
        when :meth:`payload_bits` is None (never the sender's ``payload.bits``). ``seed``: one the
        receiver decodes with anyway (its shared operator is then built once, not once more for seed 0);
        a fixed-size codec's count does not depend on it."""
        bits = self.__dict__.get("_reference_bits")
        if bits is None:
            bits = int(self.encode(torch.zeros(self.dim), seed=seed).bits)
            self.__dict__["_reference_bits"] = bits
        return bits

    def validate_payload(self, payload: Payload) -> None:
        """A received payload against :meth:`payload_spec`: codec, dim, exactly those tensors, shapes,
        dtypes, finite floats (PayloadError otherwise)."""
        spec = self.payload_spec()
        self.check_payload(payload, spec)
        extra = set(payload.tensors) - set(spec)
        if extra:
            raise PayloadError(f"{self.name}: payload has unexpected tensors {sorted(extra)}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({params})"

    def params(self) -> dict[str, Any]:
        """The constructor parameters (for configs and reprs)."""
        return {"dim": self.dim}


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"codec name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    """Registered codec names, sorted."""
    _load_builtin_codecs()
    return sorted(_REGISTRY)


def make_codec(name: str, *, dim: int, **params: Any) -> Codec:
    """Build a codec by registry name: ``make_codec("qcs", dim=d, k=32, levels=2)``.

    Unknown names and unknown parameters raise a one-line CodecError that lists what is allowed.
    """
    _load_builtin_codecs()
    if name not in _REGISTRY:
        raise CodecError(f"unknown codec {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    try:
        return cls(dim=dim, **params)
    except TypeError as exc:  # unexpected keyword -> say which ones exist
        import inspect

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "dim")]
        raise CodecError(f"codec {name!r}: {exc}; allowed parameters: {', '.join(allowed) or 'none'}") from None


def _load_builtin_codecs() -> None:
    # Import for the side effect of registration (kept lazy to avoid import cycles).
    from fl_sim.compression import codecs  # noqa: F401


def bits_for_index(n: int) -> int:
    """Bits to send one index in range(n): ceil(log2 n), at least 1 for n >= 2, 0 for n == 1."""
    return 0 if n <= 1 else math.ceil(math.log2(n))


class LinearOperator(ABC):
    """A structured matrix A of shape (m, d) with fast forward and adjoint, batched over leading dims.

    ``forward(x)``: (..., d) -> (..., m), computes A x.  ``adjoint(y)``: (..., m) -> (..., d), A^T y.
    Every operator satisfies <A x, y> = <x, A^T y> (tested).
    """

    m: int
    d: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.d)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    def dense(self) -> torch.Tensor:
        """The explicit (m, d) matrix (tests and small sizes only)."""
        return self.forward(torch.eye(self.d, dtype=torch.float64)).T.contiguous()


class DenseOperator(LinearOperator):
    """A plain matrix as a LinearOperator (reference implementation for tests)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2:
            raise CodecError(f"DenseOperator: expected a 2-D matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.m, self.d = matrix.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.matrix.dtype) @ self.matrix.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.to(self.matrix.dtype) @ self.matrix
