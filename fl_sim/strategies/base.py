"""Common server machinery of every fl-sim method: a Flower ``Strategy`` wrapper around an inner strategy.

A method wraps any Message-API strategy the way Flower's ``DifferentialPrivacy*FixedClipping`` wrap
theirs (flwr/serverapp/strategy/dp_fixed_clipping.py, paired with a client mod through shared
constants): ``QCS(FedAdam(...), k=..., levels=...)``; with no inner strategy a ``FedAvg`` is built from
the FedAvg keyword arguments (Flower's own defaults). Flower's unmodified ``Strategy.start`` runs the
rounds, so its logs, evaluation and options stay Flower's. One round (:class:`UpdateStrategy`):

1. ``configure_train``: the inner strategy's messages (FedProx's proximal-mu, the inner's config and
   sampling), each given its own ConfigRecord with the method's entries (``round_config``: codec,
   seeds...). fl-sim simulations sample *virtual client ids* from ``client_ids`` with a generator keyed
   by (seed, round) and route each to node ``sorted(nodes)[cid % len(nodes)]``, reusing the inner's
   message content; without ``client_ids`` (a user's deployment) the inner's nodes are the clients.
2. ``aggregate_train``: every reply is read on its own by :meth:`UpdateStrategy.read_reply` (the
   per-reply validation seam: one reply -> a validated :class:`ClientReply` or :class:`ReplyError`;
   a bad reply is logged, counted and left out, never aborting the round); ``combine`` decodes them
   (per client, or summed in the compressed domain and decoded once) and keeps the method's server
   state (error feedback, sketches, channel);
3. the inner strategy gets replies it aggregates as usual: ordinary model arrays ``w + Δ_i`` (or
   ``w + Δ̄`` for an aggregate-domain method, when fl-sim's own server step is on, or when the inner
   is a plain FedAvg, whose weighted mean of the ``w + Δ_i`` is ``w + Δ̄``) under its
   ``arrayrecord_key``, with the client's own MetricRecord (under ``metrics``, given the round's agreed
   metric layout: :meth:`UpdateStrategy.conform_metrics`, fl_sim.strategies.metric_keys) plus the
   server-counted ``uplink-bits``. FedAdam's optimizer, FedProx, ``weighted_by_key``, ``train_metrics_aggr_fn``
   and evaluation are the inner's, unchanged.

Returned MetricRecord: the inner's aggregate of the client metrics (names untouched) and fl-sim's
server-side figures under ``server.`` (``server.uplink_bits``, ``server.clients_ok``,
``server.round_s`` the round's wall time...). ``last_metrics`` / ``history`` hold the server figures
unprefixed (fl-sim's metrics.csv row) plus ``train_loss`` read from the client aggregate.

fl-sim's server step (``server_lr`` η_s, ``server_momentum`` μ; [Hsu-2019] "FedAvgM"), applied
to Δ̄ *before* the inner strategy: ``m ← μ m + Δ̄``, ``Δ' = η_s m``; the inner then sees ``w + Δ'``.
η_s = 1, μ = 0 (the default) leaves the updates to the inner (use FedAvgM / FedAdam for a server
optimizer in your own app).

Resume: ``round_offset`` N makes Flower's round r the method's round N + r (seeds, sampling, channel
draws); a resumed simulation runs Flower's ``start`` for the remaining rounds.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.common.logger import console_handler as flwr_console_handler
from flwr.supercore import log as flwr_log

from fl_sim.compression import PayloadError
from fl_sim.wire import keys
from fl_sim.wire.protocol import round_seed
from fl_sim.wire.records import flatten_arrays, flatten_checked, model_spec, unflatten_into
from fl_sim.rng import numpy_generator
from fl_sim.strategies import guards as reply_guards
from fl_sim.strategies import metric_keys
from fl_sim.strategies import privacy
from fl_sim.strategies.broadcast import SparseBroadcast, message_bits
from fl_sim.strategies.delegation import driver_for, overrides_start

__all__ = ["UpdateStrategy", "ClientReply", "ReplyError", "ClientSetupError", "update_sparsity", "SERVER_PREFIX"]

log = logging.getLogger("fl_sim")
if flwr_console_handler not in log.handlers:  # fl-sim's lines in Flower's format, where Flower's own go
    log.addHandler(flwr_console_handler)

SERVER_PREFIX = "server."  # server-side figures in the MetricRecord returned to Flower

# Server state of Flower's own strategies that a checkpoint must keep (FedOpt family, FedAvgM).
_INNER_STATE = ("m_t", "v_t", "momentum_vector")


def update_sparsity(g: torch.Tensor) -> float:
    """[Tang-FIHT]'s sparsity measure sp(g) = ||g||_1^2 / (d ||g||_2^2), in [1/d, 1] (docs/notes.md#tang-fiht).

    1 for a vector of equal magnitudes, K/d for K nonzeros of equal magnitude, 1/d for one nonzero;
    nan for g = 0. Computed in float64 over the aggregated update the server applies (one pass).
    """
    g64 = g.detach().reshape(-1).to(torch.float64)
    l2 = float(g64.square().sum())
    return float(g64.abs().sum()) ** 2 / (g64.numel() * l2) if l2 > 0 else float("nan")


class ReplyError(ValueError):
    """A reply that cannot be used (malformed payload, wrong shape, non-finite values)."""


class ClientSetupError(RuntimeError):
    """The first round shows the ClientApp cannot work with the method (compression_mod missing or
    misplaced): raised from ``aggregate_train``, so the ServerApp fails instead of running every round."""


@dataclass
class ClientReply:
    """One usable reply: who sent it, its weight, what it carries (method-specific ``data``), and the
    client's own MetricRecord (passed to the inner strategy untouched)."""

    node_id: int
    cid: int
    num_examples: float  # the inner's weighted_by_key value (FedAvg: "num-examples")
    uplink_bits: int
    data: Any
    metrics: MetricRecord = field(default_factory=MetricRecord)
    message: Message | None = None


def payload_meta(msg: Message) -> ConfigRecord | None:
    """The reply's payload ConfigRecord (``keys.PAYLOAD_META``), or None: ``content.config_records.get`` by
    a direct lookup (the view rebuilds and type-checks a dict of every ConfigRecord on each access)."""
    meta = msg.content.get(keys.PAYLOAD_META)
    return meta if isinstance(meta, ConfigRecord) else None


def _check_link(link: dict[str, float] | None) -> dict[str, float] | None:
    if link is None:
        return None
    allowed = {"snr_db", "bandwidth_hz", "compute_s"}
    unknown = set(link) - allowed
    if unknown or "snr_db" not in link:
        raise ValueError(f"digital_link needs snr_db and may have bandwidth_hz, compute_s; got {sorted(link)}")
    if link.get("bandwidth_hz", 1.0) <= 0 or link.get("compute_s", 0.0) < 0:
        raise ValueError(f"digital_link {link}: bandwidth_hz must be > 0 and compute_s >= 0")
    return {k: float(v) for k, v in link.items()}


def _state_to_tensors(value: Any) -> Any:
    """A Flower strategy's NumPy state (dict of ndarrays) as tensors (checkpoints load weights_only)."""
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in value.items()}
    return copy.deepcopy(value)


def _state_from_tensors(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: v.numpy().copy() if isinstance(v, torch.Tensor) else v for k, v in value.items()}
    return copy.deepcopy(value)


class UpdateStrategy(Strategy):
    """A method wrapping ``inner``: clients send updates Δ_i = w_i − w; subclasses decide how Δ travels.

    ``STATE_ATTRS``: attributes that carry server state from one round to the next (checkpointed by
    :meth:`state_dict`, with the inner strategy's FedOpt moments / FedAvgM momentum); a subclass with
    more state extends the tuple.

    Args:
        inner: the strategy that aggregates (FedAvg, FedAdam, FedProx, a user's own...); None = a
            ``FedAvg(**fedavg_kwargs)`` (Flower's defaults).
        clients_per_round: virtual clients sampled per round (with ``client_ids``); None =
            ``fraction_train`` of them.
        client_ids: virtual client ids to sample from (simulation); None = the inner's nodes.
        seed: run seed; sampling and every codec seed derive from (seed, round).
        server_lr, server_momentum: fl-sim's FedAvgM step on Δ̄ before the inner (module docstring).
        train_config: extra ConfigRecord entries sent every round (local epochs, lr...).
        digital_link: {"snr_db", "bandwidth_hz", "compute_s"}: count the channel uses of sending
            every client's bits one node after another at capacity C = 0.5 log2(1 + SNR) (Abdi
            Ch. 5, digital baseline) and the resulting latency; None = no channel accounting.
        guards: server-side bounds on what one reply can do (update norm relative to the round's
            median, num-examples cap, method scalars); see fl_sim.strategies.guards for the keys
            and their defaults (on by default).
        sparse_broadcast: send a node that holds last round's model only the entries that changed
            (indices + values; it rebuilds the new model bitwise), where that is fewer bits: for methods
            whose server update is K-sparse (FetchSGD, FIHT-CS). Off by default; needs fl-sim's
            ``compression_mod`` on the clients (fl_sim.strategies.broadcast).
        **fedavg_kwargs: FedAvg's arguments, only when ``inner`` is None.
    """

    STATE_ATTRS: tuple[str, ...] = ("momentum_buffer", "history", "rounds_aggregated")
    # Whether replies carry fl-sim's payload (compression_mod on the ClientApp); the first round checks it.
    USES_COMPRESSION_MOD = False

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        clients_per_round: int | None = None,
        client_ids: Sequence[int] | None = None,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        train_config: dict[str, Any] | None = None,
        digital_link: dict[str, float] | None = None,
        guards: dict[str, Any] | None = None,
        sparse_broadcast: bool = False,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__()
        if inner is None:
            inner = FedAvg(**fedavg_kwargs)
        elif fedavg_kwargs:
            raise TypeError(
                f"{', '.join(sorted(fedavg_kwargs))}: FedAvg options apply only without an inner strategy; "
                f"set them on the {type(inner).__name__} you pass"
            )
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner={inner!r} is not a flwr.serverapp.strategy.Strategy")
        self.inner = inner
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round={clients_per_round} must be >= 1")
        if server_lr <= 0:
            raise ValueError(f"server_lr={server_lr} must be > 0")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum={server_momentum} must be in [0, 1)")
        self.clients_per_round = clients_per_round
        self.client_ids = None if client_ids is None else np.asarray(sorted(int(c) for c in client_ids))
        if self.client_ids is not None and clients_per_round and clients_per_round > len(self.client_ids):
            raise ValueError(
                f"clients_per_round={clients_per_round} exceeds the {len(self.client_ids)} clients with data"
            )
        self.seed = int(seed)
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.train_config = dict(train_config or {})
        self.digital_link = _check_link(digital_link)
        self.round_offset = 0  # resume hook: Flower's round r is the method's round round_offset + r
        self.guards = reply_guards.check_guards(guards)
        if not isinstance(sparse_broadcast, bool):
            raise TypeError(f"sparse_broadcast={sparse_broadcast!r} must be true or false")
        self.sparse_broadcast = sparse_broadcast
        self._sparse_model = SparseBroadcast() if sparse_broadcast else None
        self._declared_bits = reply_guards.DeclaredBits()
        self._metrics_told: set[tuple[int, str]] = set()  # (client, reason) of metric layouts already logged
        self._rejected = 0  # replies of this round rejected by a check or a guard
        self.last_errors: list[tuple[int, str]] = []  # (node, reason) of this round's error replies
        # Server state (set lazily, checkpointable)
        self.momentum_buffer: torch.Tensor | None = None
        self.rounds_aggregated = 0
        self._global_arrays: ArrayRecord | None = None
        self._global_vector: torch.Tensor | None = None
        self._model_spec: dict[str, tuple[tuple[int, ...], str]] = {}
        self.sent: dict[int, int] = {}  # cid -> node of this round's train messages (configure_train)
        self._round_seed = 0
        self._downlink_bits = 0  # this round's train messages: the bits of their arrays (broadcast.message_bits)
        self._t0 = 0.0
        self.last_metrics: dict[str, float] = {}
        self.history: dict[int, dict[str, float]] = {}
        self._rounds_seen = 0  # aggregate_train calls of this object (the first one checks the client setup)
        self._outer_dp: Strategy | None = None  # a Flower DP wrapper around this method (fl_sim.strategies.privacy)
        self._dp_clip: float | None = None  # the round's client-side DP clipping norm (re-applied after decoding)

    # ------------------------------------------------------------------ what the inner's class adds
    def __getattr__(self, name: str) -> Any:
        """An attribute the wrapper lacks is the inner strategy's (its own methods and attributes:
        ``wrapper.set_save_path_and_run_dir(...)``, ``wrapper.best_acc_so_far``). Only reached when normal
        lookup fails; dunder names and a wrapper still being built (no ``inner`` yet) are not forwarded."""
        inner = self.__dict__.get("inner")
        if inner is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(inner, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object (around {type(inner).__name__}) has no attribute "
                                 f"{name!r}, nor has its inner strategy") from None

    def start(self, *args: Any, **kwargs: Any):
        """Flower's loop over the rounds: the inner strategy's own ``start`` when its class has one (its
        logging, result files and checkpoints run, with this wrapper's round methods; see
        fl_sim.strategies.delegation), else Flower's ``Strategy.start``. Same arguments and Result."""
        if overrides_start(self.inner):
            return driver_for(self.inner, self).start(*args, **kwargs)
        return super().start(*args, **kwargs)

    # ------------------------------------------------------------------ the inner strategy's keys
    @property
    def arrayrecord_key(self) -> str:
        return getattr(privacy.unwrap_dp(self.inner), "arrayrecord_key", keys.ARRAYS)

    @property
    def configrecord_key(self) -> str:
        return getattr(privacy.unwrap_dp(self.inner), "configrecord_key", keys.CONFIG)

    @property
    def weighted_by_key(self) -> str:
        return getattr(privacy.unwrap_dp(self.inner), "weighted_by_key", keys.NUM_EXAMPLES)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A copy of the server state a checkpoint needs (tensors, numbers, dicts/tuples of them)."""
        state = {name: copy.deepcopy(getattr(self, name)) for name in self.STATE_ATTRS}
        state["inner"] = {a: _state_to_tensors(getattr(self.inner, a)) for a in _INNER_STATE if hasattr(self.inner, a)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a copy; the argument is not kept)."""
        expected = set(self.STATE_ATTRS) | {"inner"}
        missing = sorted(expected - set(state))
        unknown = sorted(set(state) - expected)
        if missing or unknown:
            raise ValueError(
                f"{type(self).__name__} state: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                "was the checkpoint written by another strategy?"
            )
        for name in self.STATE_ATTRS:
            setattr(self, name, copy.deepcopy(state[name]))
        for name, value in state["inner"].items():
            setattr(self.inner, name, _state_from_tensors(value))

    # ------------------------------------------------------------------ hooks for subclasses
    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        """Add method-specific keys to the round's ConfigRecord (codec, seeds...)."""

    def round_seed_for(self, server_round: int) -> int:
        """The seed of a round's shared randomness, derived from (seed, round); a method with a fixed
        operator (one sketch, one Φ) or one changed every few rounds (RLC's A) returns its own."""
        return round_seed(self.seed, server_round)

    @property
    def round_seed(self) -> int:
        return self._round_seed

    @property
    def global_vector(self) -> torch.Tensor:
        """The round's global model as one flat float32 vector (set by configure_train)."""
        if self._global_vector is None:
            raise RuntimeError(f"{type(self).__name__}: no global model yet; configure_train runs first")
        return self._global_vector

    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        """(method data, uplink bits) of one reply; raise ReplyError when malformed.

        Default: the reply carries a full model, whose arrays must be the global model's (names, shapes,
        dtypes; nothing more: :func:`~fl_sim.wire.records.flatten_checked`); data = Δ_i = w_i − w.
        """
        arrays = self.reply_arrays(msg)
        try:
            local, bits = flatten_checked(arrays, self._model_spec)
        except PayloadError as exc:
            raise ReplyError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed reply
            raise ReplyError(f"arrays cannot be read ({exc})") from None
        if not reply_guards.all_finite(local):
            raise ReplyError("model contains NaN or inf")
        return local - self._global_vector, bits

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        """The decoded updates: (K, d) one Δ_i per reply, or (d,) an aggregate Δ̄ (compressed-domain
        methods, server-state methods). Default: the stacked Δ_i."""
        return torch.stack([r.data for r in replies])

    def server_update(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        """The update Δ' handed to the inner from Δ̄: FedAvgM m ← μ m + Δ̄, Δ' = η_s m.

        Returns ``delta`` itself when η_s = 1 and μ = 0 (per-client models go to the inner then).
        """
        if self.server_momentum > 0:
            if self.momentum_buffer is None:
                self.momentum_buffer = torch.zeros_like(delta)
            self.momentum_buffer.mul_(self.server_momentum).add_(delta)
            delta = self.momentum_buffer
            return self.server_lr * delta
        return delta if self.server_lr == 1.0 else self.server_lr * delta

    def extra_metrics(self, server_round: int, usable: list[ClientReply], delta: torch.Tensor) -> dict[str, float]:
        """Method-specific per-round server metrics (recovery error...)."""
        return {}

    def empty_round_metrics(self, server_round: int) -> dict[str, float]:
        """Method-specific server metrics of a round with no usable reply."""
        return {}

    def decodes_each_client(self) -> bool:
        """Whether the server decodes every client's update on its own (else it aggregates in the
        compressed domain and never sees one: no DP wrapper can clip per client; fl_sim.strategies.privacy)."""
        return True

    def settings(self) -> dict[str, Any]:
        """The method's options, logged by :meth:`summary`."""
        return {"seed": self.seed, "clients_per_round": self.clients_per_round}

    # ------------------------------------------------------------------ sampling
    def _available_nodes(self, grid: Grid) -> list[int]:
        wait_for = max(int(getattr(self.inner, "min_available_nodes", 1)), 1)
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < wait_for:
            if waited and waited % 10 == 0:
                log.info("waiting for nodes: %d connected, %d required", len(nodes), wait_for)
            time.sleep(0.2)
            waited += 0.2
        return nodes

    def sample(self, server_round: int, nodes: list[int]) -> list[tuple[int, int]]:
        """[(cid, node)] of this round's virtual clients, from a generator keyed by (seed, round)."""
        if self.client_ids is None:
            raise RuntimeError("sample() draws virtual clients; this strategy has no client_ids")
        rng = numpy_generator(self.seed, server_round, "sample-clients")
        fraction = float(getattr(self.inner, "fraction_train", 1.0))
        k = self.clients_per_round or max(1, int(round(len(self.client_ids) * fraction)))
        cids = np.sort(rng.choice(self.client_ids, size=min(k, len(self.client_ids)), replace=False))
        return [(int(c), nodes[int(c) % len(nodes)]) for c in cids]

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        flwr_log(INFO, "\t├──> %s (fl-sim) around %s:", type(self).__name__, type(self.inner).__name__)
        for name, value in self.settings().items():
            flwr_log(INFO, "\t│\t├── %s: %s", name, value)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        self._t0 = time.perf_counter()
        self._global_arrays = arrays
        self._global_vector = flatten_arrays(arrays)
        self._model_spec = model_spec(arrays)  # what a full-model reply must hold (decode_reply)
        self._round_seed = int(self.round_seed_for(rnd))
        self._downlink_bits = 0
        outer_dp = privacy.enclosing_dp(self)  # DP(method): Flower's wrapper calling us
        inner_msgs = list(self.inner.configure_train(rnd, arrays, config, grid))
        self._compose_privacy(outer_dp, config, inner_msgs)
        self.sent = {}
        if not inner_msgs:
            return []
        method = ConfigRecord({keys.ROUND: rnd, keys.SEED: self._round_seed})
        for k, v in self.train_config.items():
            method[k] = v
        self.round_config(rnd, method)
        if self.client_ids is not None:
            template = inner_msgs[0].content
            picked = [(cid, node, template) for cid, node in self.sample(rnd, self._available_nodes(grid))]
            flwr_log(INFO, "configure_train (fl-sim): %d virtual clients on %d nodes", len(picked),
                     len({n for _, n, _ in picked}))
        else:
            nodes = sorted(grid.get_node_ids())
            picked = [(nodes.index(m.metadata.dst_node_id) if m.metadata.dst_node_id in nodes else i,
                       m.metadata.dst_node_id, m.content) for i, m in enumerate(inner_msgs)]
        ckey = self.configrecord_key
        messages = []
        for cid, node, content in picked:
            record = RecordDict(dict(content.items()))
            cfg = ConfigRecord(dict(content[ckey])) if ckey in content else ConfigRecord()
            cfg.update(method)
            cfg[keys.ARRAYRECORD_KEY] = self.arrayrecord_key
            if self.client_ids is not None:
                cfg[keys.CID] = cid
            record[ckey] = cfg
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
            self.sent[cid] = node
        messages = self.finish_messages(rnd, arrays, messages)
        if self._sparse_model is not None:
            messages = self._sparse_model.apply(rnd, arrays, self.arrayrecord_key, ckey, messages)
        self._downlink_bits = sum(message_bits(m) for m in messages)
        return messages

    def _compose_privacy(self, outer_dp: Strategy | None, config: ConfigRecord, inner_msgs: list[Message]) -> None:
        """Check and wire a DP wrapper around (``outer_dp``) or inside this method, before anything is sent;
        note the round's client-side clipping norm (the config a client-side wrapper filled)."""
        ckey = self.configrecord_key
        sent_cfg = inner_msgs[0].content.get(ckey) if inner_msgs else None
        clip = config.get(privacy.KEY_CLIPPING_NORM)
        if clip is None and isinstance(sent_cfg, ConfigRecord):
            clip = sent_cfg.get(privacy.KEY_CLIPPING_NORM)
        self._dp_clip = None if clip is None else float(clip)
        for dp, where in ((outer_dp, "around"), (privacy.inner_dp(self.inner), "inside")):
            if dp is not None:
                privacy.check_composition(self, dp, where)
        if self._dp_clip is not None and not self.decodes_each_client():  # a client-side wrapper of another make
            privacy.check_composition(self, f"a client-side clipping_norm ({clip})", "in the train config of")
        if outer_dp is not None:
            privacy.adopt(outer_dp, self)
        self._outer_dp = outer_dp

    def finish_messages(self, server_round: int, arrays: ArrayRecord, messages: list[Message]) -> list[Message]:
        """Last look at a round's train messages, in the order of ``sent`` (a method may drop some,
        keeping ``sent`` in step, or give a message its own content). Default: unchanged."""
        return messages

    def reply_arrays(self, msg: Message) -> ArrayRecord:
        """The ArrayRecord of a reply: under ``arrayrecord_key``, else its only one."""
        content = msg.content
        named = content.get(self.arrayrecord_key)  # a direct lookup: content.array_records builds a new dict
        if isinstance(named, ArrayRecord):
            return named
        records = list(content.array_records.values())
        if len(records) != 1:
            raise ReplyError(f"reply has {len(records)} ArrayRecords and none named {self.arrayrecord_key!r}")
        return records[0]

    @staticmethod
    def reply_metrics(msg: Message) -> tuple[str, MetricRecord]:
        """(name, record) of a reply's MetricRecord: ``metrics``, else its only one."""
        named = msg.content.get(keys.METRICS)  # a direct lookup: content.metric_records builds a new dict
        if isinstance(named, MetricRecord):
            return keys.METRICS, named
        records = msg.content.metric_records
        if len(records) != 1:
            raise ReplyError(f"reply has {len(records)} MetricRecords and none named {keys.METRICS!r}")
        name, record = next(iter(records.items()))
        return name, record

    def _reply_cid(self, msg: Message, metrics: MetricRecord | None) -> int:
        """The client id of a reply: the one it reports (payload meta ``cid``, else metric ``cid``; both
        must agree), a whole number >= 0 that, in a simulation (``client_ids``), must be the id sent to
        its node this round. Without ``client_ids`` (a user's deployment) the server sent no id, so the
        reported one (the node's partition-id) is only checked for form; duplicates are caught in collect."""
        src = msg.metadata.src_node_id
        meta = payload_meta(msg)
        reported = []
        if meta is not None and keys.P_CID in meta:
            reported.append(reply_guards.finite_number(meta[keys.P_CID], f"payload {keys.P_CID!r}", lo=0, integer=True))
        if metrics is not None and keys.M_CID in metrics:
            reported.append(reply_guards.finite_number(metrics[keys.M_CID], f"metric {keys.M_CID!r}", lo=0,
                                                       integer=True))
        if reported:
            ids = [int(c) for c in reported]
            for cid in ids:
                if self.client_ids is not None and self.sent.get(cid) != src:
                    raise ReplyError(f"client id {cid} was not sent to node {src} this round")
            if len(set(ids)) > 1:
                raise ReplyError(f"payload and metrics report different client ids {ids}")
            return ids[0]
        for cid, node in self.sent.items():
            if node == src:
                return cid
        raise ReplyError(f"node {src} was sent no client this round")

    @staticmethod
    def check_reply_round(server_round: int, msg: Message) -> None:
        """A reply must answer this round: its ``fl-sim.reply`` record (added by compression_mod) holds the
        round of the train message it answers. A reply of an earlier round (stale, or replayed by its node)
        or one that names no round is a ReplyError."""
        meta = msg.content.get(keys.REPLY_META)
        if not isinstance(meta, ConfigRecord) or keys.R_ROUND not in meta:
            raise ReplyError(f"reply does not say which round it answers (no {keys.REPLY_META!r} record: is "
                             "compression_mod installed on the ClientApp?)")
        answered = int(reply_guards.finite_number(meta[keys.R_ROUND], "the reply's round", integer=True))
        if answered != server_round:
            raise ReplyError(f"reply answers round {answered}, this is round {server_round} (a stale or replayed reply)")

    def read_reply(self, server_round: int, msg: Message) -> ClientReply:
        """One reply -> a validated :class:`ClientReply`, or :class:`ReplyError` (the per-reply seam).

        Every check that depends on one reply runs here: the round it answers (:meth:`check_reply_round`),
        metrics (client id, the weight, train-loss),
        the payload's structure and values (``decode_reply``, which calls the codec's ``check_values``).
        Uplink bits are the server's own count (``decode_reply``); a client's declared ``uplink-bits``
        that disagrees is logged once per client, never used.
        """
        try:
            name, metrics = self.reply_metrics(msg)
        except ReplyError:
            metrics = None
        try:
            cid = self._reply_cid(msg, metrics)
        except (ReplyError, ValueError, TypeError, OverflowError) as exc:
            raise ReplyError(str(exc)) from None
        try:
            self.check_reply_round(server_round, msg)
            if metrics is None:
                raise ReplyError("reply has no MetricRecord")
            key = self.weighted_by_key
            if key not in metrics:
                raise ReplyError(f"reply lacks the metric {key!r} (the inner strategy's weighted_by_key)")
            # num-examples is a count; a user's own weighting key may be fractional
            weight = reply_guards.finite_number(metrics[key], f"metric {key!r}", lo=0,
                                                integer=(key == keys.NUM_EXAMPLES))
            reply_guards.train_loss(metrics.get(keys.TRAIN_LOSS), f"metric {keys.TRAIN_LOSS!r}")
            data, bits = self.decode_reply(server_round, msg, cid)
        except ReplyError as exc:
            raise ReplyError(f"client {cid}: {exc}") from None
        except (ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError, MemoryError) as exc:
            raise ReplyError(f"client {cid}: {type(exc).__name__}: {exc}") from None
        self._declared_bits.check(cid, msg.metadata.src_node_id, metrics.get(keys.UPLINK_BITS), int(bits),
                                  f"metric {keys.UPLINK_BITS!r}")
        return ClientReply(msg.metadata.src_node_id, cid, float(weight), int(bits), data, metrics, msg)

    def collect(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ClientReply], list[Message], int]:
        """(usable replies sorted by client id, error replies, number rejected).

        A reply that fails a check is rejected, logged with its node and the reason, and counted; so is
        a second reply for a client id already read this round. Error replies are kept (the inner
        strategy sees them) and their (node, reason) recorded in ``last_errors``
        (``simulation.dead_worker_error`` reads it).
        """
        usable: list[ClientReply] = []
        errors: list[Message] = []
        rejected = 0
        self.last_errors = []
        seen: set[int] = set()
        for msg in list(replies):
            node = msg.metadata.src_node_id
            if msg.has_error():
                errors.append(msg)
                self.last_errors.append((node, str(msg.error.reason)))
                log.warning("round %d: node %d replied with an error: %s", server_round, node, msg.error.reason)
                continue
            try:
                reply = self.read_reply(server_round, msg)
                if reply.cid in seen:
                    raise ReplyError(f"a second reply for client {reply.cid}")
            except ReplyError as exc:
                rejected += 1
                log.error("round %d: rejected reply from node %d (%s)", server_round, node, exc)
                continue
            seen.add(reply.cid)
            usable.append(reply)
        usable.sort(key=lambda r: r.cid)
        return usable, errors, rejected

    def _global_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The inner's aggregate with the global model's dtypes: Flower's FedAvg averages an integer
        buffer (a step counter, BatchNorm's num_batches_tracked) into float64; it stays what it was.

        The record returned is built with ``ArrayRecord(dict)``, which rebuilds every Array as a plain one
        (Flower's ``from_array_dict``): the global model never carries a :class:`~fl_sim.wire.records.ParsedArray`
        (whose deflated header would name a class the receiving side does not know)."""
        if arrays is None:
            return None
        out = {}
        for name, arr in arrays.items():
            ref = self._global_arrays.get(name) if self._global_arrays is not None else None
            nd = arr.numpy()
            if ref is not None and nd.dtype != ref.numpy().dtype:
                nd = nd.round().astype(ref.numpy().dtype) if np.issubdtype(ref.numpy().dtype, np.integer) \
                    else nd.astype(ref.numpy().dtype)
                arr = Array(nd)
            out[name] = arr
        return ArrayRecord(out)

    def inner_reply(self, reply: ClientReply, model: ArrayRecord) -> Message:
        """The reply the inner strategy aggregates: ``model`` under its arrayrecord_key and the client's
        own MetricRecord (made consistent with the round's, :meth:`conform_metrics`) plus the server-counted
        ``uplink-bits``, under the name ``metrics``. A shallow copy of the client's message
        (same metadata): the caller's reply keeps what the client sent."""
        msg = copy.copy(reply.message)
        metrics = MetricRecord(dict(reply.metrics))
        metrics[keys.UPLINK_BITS] = int(reply.uplink_bits)
        msg.content = RecordDict({self.arrayrecord_key: model, keys.METRICS: metrics})
        return msg

    def _tell_once(self, cid: int, reason: str, level: int, text: str, *args: Any) -> None:
        """Log a metric-layout finding once per (client, reason); later rounds count it silently."""
        if (cid, reason) not in self._metrics_told:
            self._metrics_told.add((cid, reason))
            log.log(level, text + " (logged once per client)", *args)

    def conform_metrics(self, server_round: int, usable: list[ClientReply]) -> tuple[list[ClientReply], int]:
        """The replies whose MetricRecords can be given the round's agreed layout (fl_sim.strategies.metric_keys),
        normalized to it, and how many had keys dropped. A reply that lacks an agreed key or sends one in
        another kind is rejected (counted in ``_rejected``): Flower's inner strategies aggregate metrics
        only when every reply has the same keys, and one odd client must not end the run."""
        if len(usable) < 2:
            return usable, 0
        ignore = (keys.UPLINK_BITS,)  # the server's own count replaces it in every reply (inner_reply)
        agreed = metric_keys.agreed_layout([metric_keys.layout(r.metrics, ignore) for r in usable])
        kept: list[ClientReply] = []
        normalized = 0
        for r in usable:
            record, note = metric_keys.conform(r.metrics, agreed, ignore)
            if record is None:
                self._rejected += 1
                self._tell_once(r.cid, note, logging.ERROR, "round %d: rejected reply from node %d (client %d): %s",
                                server_round, r.node_id, r.cid, note)
                continue
            if note:
                normalized += 1
                self._tell_once(r.cid, note, logging.WARNING, "round %d: client %d (node %d) %s", server_round,
                                r.cid, r.node_id, note)
                r.metrics = record
            kept.append(r)
        return kept, normalized

    # ---- reply guards (fl_sim.strategies.guards): hooks, and their use in aggregate_train -------------
    def reply_norm(self, reply: ClientReply) -> float | None:
        """Norm of what ``reply`` adds to the aggregate, in the domain ``combine`` sums; None = unguarded."""
        return reply_guards.tensor_norm([reply.data]) if isinstance(reply.data, torch.Tensor) else None

    def scale_reply(self, reply: ClientReply, factor: float) -> None:
        """Scale ``reply``'s contribution to the aggregate by ``factor`` (norm clipping)."""
        reply.data = reply.data * factor

    def reply_scalars(self, reply: ClientReply) -> dict[str, float]:
        """Method scalars read from the client, bounded relative to the round's median (guards.scalar_bound)."""
        return {}

    def apply_guards(self, server_round: int, usable: list[ClientReply]) -> tuple[list[ClientReply], dict[str, float]]:
        """Scalar bound, norm bound, num-examples cap over the round's usable replies (fl_sim.strategies.guards).

        Returns the replies kept (clipped/capped in place) and the counts for the round's metrics.
        """
        g = self.guards
        drop: set[int] = set()
        scalars = [self.reply_scalars(r) for r in usable]
        for name in sorted({k for sc in scalars for k in sc}):
            vals = torch.tensor([sc.get(name, 0.0) for sc in scalars], dtype=torch.float64)
            for j in torch.nonzero(reply_guards.relative_outliers(vals, g["scalar_bound"])).flatten().tolist():
                drop.add(j)
                log.error("round %d: rejected reply from node %d (client %d): %s = %.3g exceeds %g x the round's "
                          "median", server_round, usable[j].node_id, usable[j].cid, name, float(vals[j]),
                          g["scalar_bound"])
        clipped = 0
        norms = [None if j in drop else self.reply_norm(r) for j, r in enumerate(usable)]
        guarded = [j for j, v in enumerate(norms) if v is not None]
        if guarded:
            nv = torch.tensor([norms[j] for j in guarded], dtype=torch.float64)
            factors = reply_guards.norm_factors(nv, g["norm_bound"], g["max_norm"])
            for j, f, v in zip(guarded, factors.tolist(), nv.tolist()):
                if f >= 1.0:
                    continue
                r = usable[j]
                if g["norm_mode"] == "reject":
                    drop.add(j)
                    log.error("round %d: rejected reply from node %d (client %d): update norm %.3g beyond the "
                              "norm guard's %.3g", server_round, r.node_id, r.cid, v, v * f)
                else:
                    self.scale_reply(r, f)
                    clipped += 1
                    log.warning("round %d: clipped the update of client %d (node %d) from norm %.3g to %.3g",
                                server_round, r.cid, r.node_id, v, v * f)
        self._rejected += len(drop)
        usable = [r for j, r in enumerate(usable) if j not in drop]
        capped = 0
        if usable:
            n = torch.tensor([float(r.num_examples) for r in usable], dtype=torch.float64)
            known = reply_guards.known_sizes(g["client_sizes"], [r.cid for r in usable])
            capped_n = reply_guards.cap_counts(n, g["weight_cap"], g["max_num_examples"], known)
            for r, before, after in zip(usable, n.tolist(), capped_n.tolist()):
                if after < before:
                    capped += 1
                    log.warning("round %d: capped the num-examples of client %d (node %d) from %.3g to %.3g",
                                server_round, r.cid, r.node_id, before, after)
                    r.num_examples = after
                    # the inner weighs by the client's MetricRecord, not by num_examples: cap it there too
                    r.metrics = MetricRecord(dict(r.metrics))
                    r.metrics[self.weighted_by_key] = int(after) if float(after).is_integer() else float(after)
        return usable, {"rejected_by_guards": len(drop), "replies_clipped": float(clipped),
                        "weights_capped": float(capped)}
    # ---- end of reply guards ---------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        if self._global_vector is None:
            raise RuntimeError("aggregate_train called before configure_train: no global model for this round")
        replies = list(replies)
        if self._sparse_model is not None:
            self._sparse_model.observe_replies(rnd, replies)
        usable, errors, rejected = self.collect(rnd, replies)
        self._rounds_seen += 1
        if self._rounds_seen == 1 and not usable and replies:
            self.check_client_setup(rnd, replies)
        self._rejected = rejected
        usable, guard_counts = self.apply_guards(rnd, usable)  # reply guards (adds its drops to _rejected)
        guard_counts.pop("rejected_by_guards")
        usable, normalized = self.conform_metrics(rnd, usable)  # one metric layout for the inner strategy
        if self._dp_clip is not None and usable:  # client-side DP: a codec may enlarge the clipped update
            guard_counts["dp_reclipped"] = float(privacy.clip_decoded(self, usable, self._dp_clip))
        metrics: dict[str, float] = {
            "clients_ok": len(usable),
            "clients_failed": len(errors) + self._rejected,
            "clients_rejected": self._rejected,
            **guard_counts,
            "metrics_normalized": normalized,
            "uplink_bits": sum(r.uplink_bits for r in usable),
            "downlink_bits": self._downlink_bits,
        }
        metrics["total_bits"] = metrics["uplink_bits"] + metrics["downlink_bits"]
        if self._sparse_model is not None:
            metrics["sparse_broadcasts"] = self._sparse_model.sparse_messages
        if self.digital_link is not None:
            from fl_sim.channels import digital_channel_uses, latency_s

            link = self.digital_link
            uses = digital_channel_uses([r.uplink_bits for r in usable], link["snr_db"])
            metrics["channel_uses"] = uses
            metrics["latency_s"] = latency_s(uses, link.get("bandwidth_hz", 1e6), link.get("compute_s", 0.0))
        if not usable:
            if replies:
                log.error(
                    "round %d: none of the %d replies could be used (%d errors, %d rejected); the global model is "
                    "unchanged. Likely cause: the ClientApp lacks fl-sim's compression_mod "
                    "(ClientApp(mods=[compression_mod])) or does not report %r", rnd, len(replies), len(errors),
                    self._rejected, self.weighted_by_key)
            elif self.sent:
                log.error("round %d: no replies (no client answered); the global model is unchanged", rnd)
            metrics.update(self.empty_round_metrics(rnd))
            return None, self._finish(rnd, metrics, None)
        w = torch.tensor([r.num_examples for r in usable], dtype=torch.float64)
        weights = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))
        try:
            update = self.combine(rnd, usable, weights)
        except ValueError as exc:  # reply guards: a value no per-reply check caught must not end the run
            log.error("round %d: the replies passed the per-reply checks but could not be aggregated (%s); the "
                      "global model is unchanged (a codec's check_values misses this case)", rnd, exc)
            return None, self._finish(rnd, metrics, None)
        if update.dim() != 2 and (self._outer_dp is not None or privacy.inner_dp(self.inner) is not None):
            raise privacy.PrivacyCompositionError(  # a method that did not declare it (decodes_each_client)
                f"{type(self).__name__} returned an aggregate, not one update per client: a DP wrapper cannot clip "
                f"per client; declare decodes_each_client() False so it is refused before round 1")
        delta = weights.to(update.dtype) @ update if update.dim() == 2 else update
        if not reply_guards.all_finite(delta):
            log.error("round %d: the aggregate update is not finite; the global model is unchanged", rnd)
            return None, self._finish(rnd, metrics, None)
        delta = delta.to(torch.float32)
        step = self.server_update(rnd, delta)
        if update.dim() == 2 and step is delta and (type(self.inner) is not FedAvg or self._outer_dp is not None):
            # no server step: each client's model goes to the inner (FedMedian, Krum, a DP wrapper's per-client
            # clipping... see every client). A plain FedAvg's weighted mean of the w + Δ_i is w + Δ̄: it gets that
            # one model instead of K copies.
            models = [unflatten_into(self._global_arrays, self._global_vector + u.to(torch.float32)) for u in update]
        else:
            one = unflatten_into(self._global_arrays, self._global_vector + step, parsed=True)  # read K times
            models = [one] * len(usable)
        if float(w.sum()) <= 0 and (self._outer_dp is not None or privacy.inner_dp(self.inner) is not None):
            # skipping the inner would skip the DP wrapper's clipping and noise: release nothing instead
            log.error("round %d: the replies' %r sum to 0 and a DP wrapper must see them; the global model is "
                      "unchanged", rnd, self.weighted_by_key)
            new_arrays, client_metrics = None, None
        elif float(w.sum()) <= 0:  # nothing to weigh (e.g. DaQuSGD nodes that sent no sample): apply Δ' directly
            new_arrays, client_metrics = self._global_dtypes(models[0]), None  # plain Arrays (see there)
            log.warning("round %d: the replies' %r sum to 0; the inner strategy is skipped", rnd, self.weighted_by_key)
        else:
            inner_replies = [self.inner_reply(r, m) for r, m in zip(usable, models)] + errors
            if self._outer_dp is not None:  # DP(method): the wrapper's clipping and noise over the decoded models
                new_arrays, client_metrics = privacy.outer_dp_aggregate(self._outer_dp, self.inner, server_round,
                                                                        inner_replies)
            else:
                new_arrays, client_metrics = self.inner.aggregate_train(rnd, inner_replies)
                if new_arrays is not None and type(self.inner) is FedAvg and all(m is models[0] for m in models):
                    # the weighted mean of K copies of one model is that model; Flower's FedAvg accumulates
                    # Σ (n_i/n) w in float32 and moves ~14% of the entries by an ulp (measured on an MLP), which
                    # would make a K-sparse server update (FetchSGD, FIHT-CS) dense on the next broadcast
                    new_arrays = models[0]
            new_arrays = self._global_dtypes(new_arrays)
        dense_bits = 32 * self._global_vector.numel() * len(usable)
        metrics["compression_ratio"] = dense_bits / metrics["uplink_bits"] if metrics["uplink_bits"] else float("nan")
        if bool(delta.any()):  # sp(0) is undefined: a round that applied nothing has no sparsity to report
            metrics["update_sparsity"] = update_sparsity(delta)
        metrics.update(self.extra_metrics(rnd, usable, delta))
        if new_arrays is not None:
            self.rounds_aggregated += 1
        return new_arrays, self._finish(rnd, metrics, client_metrics)

    def check_client_setup(self, server_round: int, replies: list[Message]) -> None:
        """First round, no usable reply: raise :class:`ClientSetupError` when every reply shows the ClientApp
        lacks compression_mod (a plain model: no payload, or for the uncompressed baseline no round record)
        or compression_mod refused its place (an error
        reply from it). Other failures (client crashes, bad values) keep the per-round handling."""
        def lacks_mod(m: Message) -> bool:  # a compressed method needs the payload; every method the round record
            if self.USES_COMPRESSION_MOD:
                return payload_meta(m) is None
            return not isinstance(m.content.get(keys.REPLY_META), ConfigRecord)

        plain = [m for m in replies if not m.has_error() and lacks_mod(m)]
        refused = [m for m in replies if m.has_error() and str(m.error.reason).startswith("compression_mod")]
        if len(plain) + len(refused) < len(replies):
            return
        if refused:
            raise ClientSetupError(f"round {server_round}: every reply failed in compression_mod: "
                                   f"{refused[0].error.reason}")
        what = "fl-sim's compressed payload" if self.USES_COMPRESSION_MOD else f"the {keys.REPLY_META!r} round record"
        raise ClientSetupError(
            f"round {server_round}: none of the {len(replies)} replies carries {what}: the "
            f"ClientApp lacks compression_mod; add it (from fl_sim.clients import compression_mod; "
            f"ClientApp(mods=[compression_mod])) so {type(self).__name__} receives encoded updates"
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner's evaluate messages; their arrays join the round's downlink (Flower configures the
        evaluation after ``aggregate_train`` and before the row is recorded: ``downlink_eval_bits`` is
        added to ``downlink_bits`` and ``total_bits`` of ``last_metrics`` / ``history``; the train
        MetricRecord already returned to Flower counts the train messages only)."""
        rnd = server_round + self.round_offset
        messages = list(self.inner.configure_evaluate(rnd, arrays, config, grid))
        bits = sum(message_bits(m) for m in messages)
        if bits:
            for row in {id(r): r for r in (self.last_metrics, self.history.get(rnd)) if r}.values():
                row["downlink_eval_bits"] = bits
                row["downlink_bits"] = row.get("downlink_bits", 0) + bits
                row["total_bits"] = row.get("total_bits", 0) + bits
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        return self.inner.aggregate_evaluate(rnd, self.conform_evaluate(rnd, list(replies)))

    def conform_evaluate(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Evaluate replies with one metric layout (as :meth:`conform_metrics` for train replies): a reply
        with no single MetricRecord, without the weight key, or that cannot be given the round's agreed
        layout is left out (logged once per node); error replies pass through to the inner."""
        records: list[tuple[Message, MetricRecord]] = []
        out = [m for m in replies if m.has_error()]
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            try:
                _, record = self.reply_metrics(msg)
                if self.weighted_by_key not in record:
                    raise ReplyError(f"lacks the metric {self.weighted_by_key!r}")
            except ReplyError as exc:
                self._tell_once(node, f"evaluate: {exc}", logging.ERROR,
                                "round %d: left out the evaluate reply of node %d: %s", server_round, node, exc)
                continue
            records.append((msg, record))
        if not records:
            return out
        agreed = metric_keys.agreed_layout([metric_keys.layout(r) for _, r in records])
        for msg, record in records:
            node = msg.metadata.src_node_id
            kept, note = metric_keys.conform(record, agreed)
            if note:
                self._tell_once(node, f"evaluate: {note}", logging.ERROR if kept is None else logging.WARNING,
                                "round %d: evaluate reply of node %d %s", server_round, node,
                                note if kept is not None else f"left out: it {note}")
            if kept is None:
                continue
            reply = copy.copy(msg)
            reply.content = RecordDict({keys.METRICS: kept})
            out.append(reply)
        return out

    def _finish(self, server_round: int, metrics: dict[str, float], client: MetricRecord | None) -> MetricRecord:
        """Record the round (``last_metrics``/``history``) and build the MetricRecord returned to Flower."""
        metrics.update(self.__dict__.pop("round_extras", None) or {})  # a grid proxy's figures (SecAgg+)
        metrics["round_s"] = time.perf_counter() - self._t0
        row = dict(metrics)
        loss = None
        if client is not None:
            loss = next((client[k] for k in ("train_loss", keys.TRAIN_LOSS, "loss") if k in client), None)
        row["train_loss"] = float(loss) if isinstance(loss, (int, float)) else float("nan")
        self.last_metrics = row
        self.history[server_round] = dict(row)
        out = MetricRecord(dict(client) if client is not None else {})
        if isinstance(out.get(keys.UPLINK_BITS), float):  # the inner's weighted mean of whole bit counts
            out[keys.UPLINK_BITS] = int(round(out[keys.UPLINK_BITS]))
        for k, v in metrics.items():
            out[SERVER_PREFIX + k] = int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)
        return out
