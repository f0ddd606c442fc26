"""Common server machinery of every fl-sim strategy (a Flower Message-API FedAvg subclass).

:class:`UpdateStrategy` does what all compressed-uplink methods share, so each method overrides
only how replies become an aggregate update (``decode_replies``/``combine``):

1. ``configure_train``: seeded client sampling (never the global RNG), one message per sampled
   client carrying the global model and a ConfigRecord with the round seed and client id;
2. ``aggregate_train``: read the replies once, log failed ones, reject malformed ones with a logged
   error naming the node (never a crash, never a poisoned model), aggregate the rest in client-id
   order (deterministic float sums), apply the server optimizer, report metrics.

Server optimizer (FedAvg with server learning rate and momentum; Hsu et al. 2019 "FedAvgM"):
``m ← μ m + Δ̄``, ``w ← w + η_s m``, where Δ̄ = Σ_i (n_i/n) Δ_i is the weighted mean client
update. η_s = 1, μ = 0 is plain FedAvg (the weighted mean of the client models).

Virtual clients: in fl-sim simulations the strategy samples *client ids* (data partitions) from
``client_ids`` and routes each to node ``sorted(nodes)[cid % len(nodes)]``; the client reads its id
from the message. Without ``client_ids`` (a user's deployment), nodes are the clients.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from logging import INFO
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log as flwr_log

from .. import keys
from ..protocol import round_seed
from ..records import array_bits, flatten_arrays, unflatten_into
from ..rng import numpy_generator
from . import guards as reply_guards

__all__ = ["UpdateStrategy", "ClientReply", "ReplyError", "update_sparsity"]

log = logging.getLogger("fl_sim")


def update_sparsity(g: torch.Tensor) -> float:
    """Tang et al.'s sparsity measure sp(g) = ||g||_1^2 / (d ||g||_2^2), in [1/d, 1] (NOTES §4).

    1 for a vector of equal magnitudes, K/d for K nonzeros of equal magnitude, 1/d for one nonzero;
    nan for g = 0. Computed in float64 over the aggregated update the server applies (one pass).
    """
    g64 = g.detach().reshape(-1).to(torch.float64)
    l2 = float(g64.square().sum())
    return float(g64.abs().sum()) ** 2 / (g64.numel() * l2) if l2 > 0 else float("nan")


class ReplyError(ValueError):
    """A reply that cannot be used (malformed payload, wrong shape, non-finite values)."""


@dataclass
class ClientReply:
    """One usable reply: who sent it, its weight and what it carries (method-specific ``data``)."""

    node_id: int
    cid: int
    num_examples: int
    train_loss: float
    uplink_bits: int
    data: Any


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


class UpdateStrategy(FedAvg):
    """FedAvg whose clients send updates Δ_i = w_i − w; subclasses decide how Δ travels.

    ``STATE_ATTRS``: attributes that carry server state from one round to the next (checkpointed by
    :meth:`state_dict`); a subclass with more state extends the tuple.

    Args (keyword-only, besides FedAvg's own ``**kwargs``):
        clients_per_round: clients sampled per round (count); None = ``fraction_train`` of nodes.
        client_ids: virtual client ids to sample from (simulation); None = sample nodes.
        seed: run seed; sampling and every codec seed derive from (seed, round).
        server_lr: η_s of the server step. server_momentum: μ of the server step.
        train_config: extra ConfigRecord entries sent every round (local epochs, lr...).
        digital_link: {"snr_db", "bandwidth_hz", "compute_s"}: count the channel uses of sending
            every client's bits one node after another at capacity C = 0.5 log2(1 + SNR) (Abdi
            Ch. 5, digital baseline) and the resulting latency; None = no channel accounting.
        guards: server-side bounds on what one reply can do (update norm relative to the round's
            median, num-examples cap, method scalars); see fl_sim.strategies.guards for the keys
            and their defaults (on by default).
    """

    STATE_ATTRS: tuple[str, ...] = ("momentum_buffer", "history")

    def __init__(
        self,
        *,
        clients_per_round: int | None = None,
        client_ids: Sequence[int] | None = None,
        seed: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        train_config: dict[str, Any] | None = None,
        digital_link: dict[str, float] | None = None,
        guards: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # fl-sim evaluates centrally on the server: no federated evaluation unless asked for.
        # (Set after FedAvg's constructor, which would log a warning for 0.0.)
        fraction_evaluate = kwargs.pop("fraction_evaluate", 0.0)
        kwargs.setdefault("min_available_nodes", 1)
        kwargs.setdefault("min_train_nodes", 1)
        super().__init__(**kwargs)
        self.fraction_evaluate = float(fraction_evaluate)
        if self.fraction_evaluate == 0.0:
            self.min_evaluate_nodes = 0
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
        self.guards = reply_guards.check_guards(guards)
        self._declared_bits = reply_guards.DeclaredBits()
        self._rejected = 0  # replies of this round rejected by a check or a guard
        self.last_errors: list[tuple[int, str]] = []
        # Server state (set lazily, checkpointable)
        self.momentum_buffer: torch.Tensor | None = None
        self._global_arrays: ArrayRecord | None = None
        self._global_vector: torch.Tensor | None = None
        self._sent: dict[int, int] = {}  # cid -> node of this round
        self._round_seed = 0
        self._downlink_bits_each = 0
        self._t0 = 0.0
        self.last_metrics: dict[str, float] = {}
        self.history: dict[int, dict[str, float]] = {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """A copy of the server state a checkpoint needs (tensors, numbers, dicts/tuples of them)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.STATE_ATTRS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (a copy; the argument is not kept)."""
        missing = sorted(set(self.STATE_ATTRS) - set(state))
        unknown = sorted(set(state) - set(self.STATE_ATTRS))
        if missing or unknown:
            raise ValueError(
                f"{type(self).__name__} state: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                "was the checkpoint written by another strategy?"
            )
        for name in self.STATE_ATTRS:
            setattr(self, name, copy.deepcopy(state[name]))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
        start_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` (flwr 1.41, same steps and logs) from round ``start_round``.

        ``start_round=1`` is Flower's loop unchanged. ``start_round=N+1`` resumes after a checkpoint of
        round N: ``initial_arrays`` is that round's global model, the strategy's state has been
        loaded, and the round-0 evaluation is skipped (its row is in the checkpoint).
        """
        if not 1 <= start_round <= num_rounds + 1:
            raise ValueError(f"start_round={start_round} must be in 1..{num_rounds + 1}")
        flwr_log(INFO, "Starting %s strategy (rounds %d..%d):", type(self).__name__, start_round, num_rounds)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        t_start = time.time()
        if evaluate_fn and start_round == 1:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        arrays = initial_arrays
        if start_round > 1:
            result.arrays = arrays
        for current_round in range(start_round, num_rounds + 1):
            flwr_log(INFO, "")
            flwr_log(INFO, "[ROUND %s/%s]", current_round, num_rounds)
            train_replies = self.send_train(grid, self.configure_train(current_round, arrays, train_config, grid),
                                            timeout)
            agg_arrays, agg_train_metrics = self.aggregate_train(current_round, train_replies)
            if agg_arrays is not None:
                result.arrays = agg_arrays
                arrays = agg_arrays
            if agg_train_metrics is not None:
                flwr_log(INFO, "\t└──> Aggregated MetricRecord: %s", agg_train_metrics)
                result.train_metrics_clientapp[current_round] = agg_train_metrics
            evaluate_replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid), timeout=timeout
            )
            agg_evaluate_metrics = self.aggregate_evaluate(current_round, evaluate_replies)
            if agg_evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[current_round] = agg_evaluate_metrics
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        flwr_log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        flwr_log(INFO, "Final results:")
        for line in io.StringIO(str(result)):
            flwr_log(INFO, "\t%s", line.strip("\n"))
        return result

    # ------------------------------------------------------------------ hooks for subclasses
    def round_config(self, server_round: int, config: ConfigRecord) -> None:
        """Add method-specific keys to the round's ConfigRecord (codec, seeds...)."""

    def decode_reply(self, server_round: int, msg: Message, cid: int) -> tuple[Any, int]:
        """(method data, uplink bits) of one reply; raise ReplyError when malformed.

        Default: the reply carries a full model; data = Δ_i = w_i − w.
        """
        arrays = msg.content.get(keys.ARRAYS)
        if arrays is None:
            raise ReplyError("reply has no arrays")
        try:
            local = flatten_arrays(arrays)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a malformed reply
            raise ReplyError(f"arrays cannot be read ({exc})") from None
        if local.shape != self._global_vector.shape:
            raise ReplyError(f"model has {local.numel()} parameters, expected {self._global_vector.numel()}")
        if not torch.isfinite(local).all():
            raise ReplyError("model contains NaN or inf")
        return local - self._global_vector, array_bits(arrays)

    def combine(self, server_round: int, replies: list[ClientReply], weights: torch.Tensor) -> torch.Tensor:
        """Aggregate update Δ̄ from the usable replies (weights sum to 1). Default: Σ w_i Δ_i."""
        stacked = torch.stack([r.data for r in replies])
        return weights.to(stacked.dtype) @ stacked

    def server_step(self, server_round: int, delta: torch.Tensor) -> torch.Tensor:
        """New global vector from Δ̄: FedAvgM step m ← μ m + Δ̄, w ← w + η_s m."""
        if self.server_momentum > 0:
            if self.momentum_buffer is None:
                self.momentum_buffer = torch.zeros_like(delta)
            self.momentum_buffer.mul_(self.server_momentum).add_(delta)
            delta = self.momentum_buffer
        return self._global_vector + self.server_lr * delta

    # ------------------------------------------------------------------ sampling
    def _available_nodes(self, grid: Grid) -> list[int]:
        wait_for = max(self.min_available_nodes, 1)
        waited = 0.0
        while len(nodes := sorted(grid.get_node_ids())) < wait_for:
            if waited and waited % 10 == 0:
                log.info("waiting for nodes: %d connected, %d required", len(nodes), wait_for)
            time.sleep(0.2)
            waited += 0.2
        return nodes

    def sample(self, server_round: int, nodes: list[int]) -> list[tuple[int, int]]:
        """[(cid, node)] for this round, from a generator keyed by (seed, round)."""
        rng = numpy_generator(self.seed, server_round, "sample-clients")
        if self.client_ids is None:
            k = self.clients_per_round or max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
            k = min(k, len(nodes))
            chosen = sorted(rng.choice(len(nodes), size=k, replace=False).tolist())
            return [(i, nodes[i]) for i in chosen]
        k = self.clients_per_round or max(1, int(round(len(self.client_ids) * self.fraction_train)))
        cids = np.sort(rng.choice(self.client_ids, size=min(k, len(self.client_ids)), replace=False))
        return [(int(c), nodes[int(c) % len(nodes)]) for c in cids]

    # ------------------------------------------------------------------ Flower API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._t0 = time.perf_counter()
        self._global_arrays = arrays
        self._global_vector = flatten_arrays(arrays)
        self._round_seed = round_seed(self.seed, server_round)
        self._downlink_bits_each = array_bits(arrays)
        config[keys.ROUND] = server_round
        config[keys.SEED] = self._round_seed
        for k, v in self.train_config.items():
            config[k] = v
        self.round_config(server_round, config)
        nodes = self._available_nodes(grid)
        picked = self.sample(server_round, nodes)
        self._sent = {cid: node for cid, node in picked}
        messages = []
        for cid, node in picked:
            cfg = ConfigRecord(dict(config))
            if self.client_ids is not None:
                cfg[keys.CID] = cid
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def send_train(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """``grid.send_and_receive`` of the round's train messages, one message per node at a time when
        two of them go to one node and the clients keep residuals in node contexts (client error feedback
        with ``keys.EF_STORE`` = context, as read from the messages' config).

        Flower's simulation engine runs two messages of one node concurrently and keeps only one of the
        contexts they return, so a residual update would be lost (measured: top-k + EF, 12 clients on 3
        Ray nodes, drifted from the one-node-per-client run from round 2). Waves (the k-th message of
        every node in wave k) keep the replies, hence the aggregate, those of one node per client.
        """
        messages = list(messages)
        nodes = [m.metadata.dst_node_id for m in messages]
        config = messages[0].content.get(self.configrecord_key) if messages else None
        held = config is not None and str(config.get(keys.EF, "none")) != "none" and \
            str(config.get(keys.EF_STORE, "context")) == "context"
        if not held or len(set(nodes)) == len(nodes):
            return list(grid.send_and_receive(messages=messages, timeout=timeout))
        if not getattr(self, "_told_waves", False):
            self._told_waves = True
            log.info("%d clients on %d nodes keep residuals in node contexts; a node's clients are sent in "
                     "successive waves (one message per node at a time)", len(nodes), len(set(nodes)))
        waves: list[list[Message]] = []
        seen: dict[int, int] = {}
        for msg, node in zip(messages, nodes):
            k = seen.get(node, 0)
            seen[node] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(msg)
        replies: list[Message] = []
        for wave in waves:
            replies.extend(grid.send_and_receive(messages=wave, timeout=timeout))
        return replies

    def _reply_cid(self, msg: Message, metrics: MetricRecord | None) -> int:
        """The client id of a reply: the one it reports, which must be the id sent to its node this round."""
        src = msg.metadata.src_node_id
        if metrics is not None and keys.M_CID in metrics:
            cid = int(reply_guards.finite_number(metrics[keys.M_CID], f"metric {keys.M_CID!r}", lo=0, integer=True))
            if self._sent.get(cid) != src:
                raise ReplyError(f"client id {cid} was not sent to node {src} this round")
            return cid
        for cid, node in self._sent.items():
            if node == src:
                return cid
        raise ReplyError(f"node {src} was sent no client this round")

    def collect(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ClientReply], int]:
        """Usable replies sorted by client id, and the number of failed/rejected ones.

        Every check that depends on one reply runs here, inside the per-reply ``try``: metrics
        (client id, num-examples, train-loss), the payload's structure and values (``decode_reply``,
        which calls the codec's ``check_values``); a reply that fails one is rejected, logged with its
        node and the reason, and counted. Uplink bits are the server's own count (``decode_reply``);
        a client's declared ``uplink-bits`` that disagrees is logged once per client, never used.
        """
        usable: list[ClientReply] = []
        failed = 0
        self._rejected = 0
        self.last_errors: list[tuple[int, str]] = []  # (node, reason) of this round's error replies
        seen: set[int] = set()
        for msg in list(replies):
            node = msg.metadata.src_node_id
            if msg.has_error():
                failed += 1
                self.last_errors.append((node, str(msg.error.reason)))
                log.warning("round %d: node %d replied with an error: %s", server_round, node, msg.error.reason)
                continue
            cid = -1
            try:
                metrics = msg.content.get(keys.METRICS)
                cid = self._reply_cid(msg, metrics)
                if cid in seen:
                    raise ReplyError(f"a second reply for client {cid}")
                if metrics is None or keys.NUM_EXAMPLES not in metrics:
                    raise ReplyError(f"reply lacks the metric {keys.NUM_EXAMPLES!r}")
                n = int(reply_guards.finite_number(metrics[keys.NUM_EXAMPLES], f"metric {keys.NUM_EXAMPLES!r}",
                                                   lo=0, integer=True))
                loss = reply_guards.train_loss(metrics.get(keys.TRAIN_LOSS), f"metric {keys.TRAIN_LOSS!r}")
                data, bits = self.decode_reply(server_round, msg, cid)
            except (ReplyError, ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError,
                    MemoryError) as exc:
                failed += 1
                self._rejected += 1
                log.error("round %d: rejected reply from node %d (client %d): %s", server_round, node, cid, exc)
                continue
            seen.add(cid)
            self._declared_bits.check(cid, node, metrics.get(keys.UPLINK_BITS), int(bits), f"metric {keys.UPLINK_BITS!r}")
            usable.append(ClientReply(node, cid, n, loss, int(bits), data))
        usable.sort(key=lambda r: r.cid)
        return usable, failed

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
        return usable, {"rejected_by_guards": len(drop), "replies_clipped": float(clipped),
                        "weights_capped": float(capped)}
    # ---- end of reply guards ---------------------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global_vector is None:
            raise RuntimeError("aggregate_train called before configure_train: no global model for this round")
        usable, failed = self.collect(server_round, replies)
        usable, guard_counts = self.apply_guards(server_round, usable)  # reply guards
        metrics: dict[str, float] = {
            "clients_ok": len(usable),
            "clients_failed": failed + guard_counts.pop("rejected_by_guards"),
            "clients_rejected": self._rejected,
            **guard_counts,
            "uplink_bits": sum(r.uplink_bits for r in usable),
            "downlink_bits": self._downlink_bits_each * len(self._sent),
        }
        if self.digital_link is not None:
            from ..channels import digital_channel_uses, latency_s

            link = self.digital_link
            uses = digital_channel_uses([r.uplink_bits for r in usable], link["snr_db"])
            metrics["channel_uses"] = uses
            metrics["latency_s"] = latency_s(uses, link.get("bandwidth_hz", 1e6), link.get("compute_s", 0.0))
        if not usable:
            log.warning("round %d: no usable replies; the global model is unchanged", server_round)
            self._finish(server_round, metrics)
            return None, MetricRecord(metrics)
        n = torch.tensor([float(r.num_examples) for r in usable], dtype=torch.float64)
        weights = n / n.sum() if n.sum() > 0 else torch.full_like(n, 1.0 / len(n))
        try:
            delta = self.combine(server_round, usable, weights)
        except ValueError as exc:  # reply guards: a value no per-reply check caught must not end the run
            log.error("round %d: the replies passed the per-reply checks but could not be aggregated (%s); the "
                      "global model is unchanged (a codec's check_values misses this case)", server_round, exc)
            self._finish(server_round, metrics)
            return None, MetricRecord(metrics)
        if not torch.isfinite(delta).all():
            log.error("round %d: the aggregate update is not finite; the global model is unchanged", server_round)
            self._finish(server_round, metrics)
            return None, MetricRecord(metrics)
        new_vector = self.server_step(server_round, delta.to(torch.float32))
        losses = np.array([r.train_loss for r in usable])
        metrics["train_loss"] = float(np.average(losses, weights=weights.numpy())) if np.isfinite(losses).all() else float("nan")
        dense_bits = 32 * self._global_vector.numel() * len(usable)
        metrics["compression_ratio"] = dense_bits / metrics["uplink_bits"] if metrics["uplink_bits"] else float("nan")
        if bool(delta.any()):  # sp(0) is undefined: a round that applied nothing has no sparsity to report
            metrics["update_sparsity"] = update_sparsity(delta)
        metrics.update(self.extra_metrics(server_round, usable, delta))
        self._finish(server_round, metrics)
        return unflatten_into(self._global_arrays, new_vector), MetricRecord(metrics)

    def extra_metrics(self, server_round: int, usable: list[ClientReply], delta: torch.Tensor) -> dict[str, float]:
        """Method-specific per-round metrics (recovery error...)."""
        return {}

    def _finish(self, server_round: int, metrics: dict[str, float]) -> None:
        metrics["server_s"] = time.perf_counter() - self._t0
        self.last_metrics = dict(metrics)
        self.history[server_round] = dict(metrics)
