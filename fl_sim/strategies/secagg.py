"""SecAgg+ for Message-API strategies: a Grid proxy that runs a round's train step through the four stages.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 ([Bell-2020]),
as Flower implements it for its legacy API (``SecAggPlusWorkflow`` / ``secaggplus_mod``), here for the
Message API: Flower's ``Strategy.start`` calls ``grid.send_and_receive`` with the round's train
messages, so the server half lives on the grid (as :class:`~fl_sim.strategies.waves.WaveGrid` does).
``strategy.start(grid=SecAggPlusGrid(grid, strategy, num_shares=..., reconstruction_threshold=...))``
with ``ClientApp(..., mods=[secagg_mod, compression_mod])`` on the clients (fl_sim.clients.secagg_mod).

One round (sampled clients U0, secure ids 1..N in a random order on a ring; each client's neighbours
N(i) are the ``num_shares`` // 2 on either side):

1. setup: parameters out, two public keys back (U1 = those that answered);
2. share_keys: each client gets its neighbours' keys, returns t-of-|N(i)| Shamir shares of its self-mask
   seed b_i and of sk1_i, encrypted for each neighbour (U2);
3. collect_masked_vectors: the round's train content plus the shares forwarded to it; the client
   trains and returns y_i = q_i + PRG(b_i) + Σ_{j ∈ N(i) ∩ U2} ±PRG(s_ij) in Z_M (U3);
4. unmask: each survivor returns its shares of b_j for j ∈ N(i) ∩ U3 and of sk1_j for j ∈ N(i) ∩ (U2 − U3)
   (U4). The server rebuilds every b_j and every dropped sk1_j from ≥ t shares, removes the self-masks
   and the masks the survivors added for dropped neighbours, and is left with Σ_{i ∈ U3} q_i mod M.

Then it decodes the sum (``fl_sim.wire.secagg``: fixed point, error bound) into the weighted mean
Σ n_i x_i / Σ n_i of what the clients would have sent, and hands the strategy **one** reply carrying
that mean with weight Σ n_i: the payload tensors' mean for a linear codec (Count Sketch tables,
compressed-sensing measurements, identity), or the model w + Δ̄ without a codec. A method that sums
payloads in the compressed domain computes exactly this mean from K replies, so its ``combine`` on the
one reply gives the plaintext round's result up to the quantization bound. Per-reply checks and guards
see the aggregate (the server cannot see single updates under secure aggregation, by design).

A round with fewer than t shares for a secret it needs, or with fewer than 2 clients, fails cleanly:
``SecAggError``, or, with ``on_failure="skip"``, no reply (the strategy keeps the global model and
logs the round as empty).

1-bit CS with a common Φ is summed in its one-client aggregate form (each client's own dither removed
before masking: fl_sim.clients.secagg_mod). Refused (one-line error): codecs whose server must decode
each client (QSGD, top-k, sign, TernGrad, QCS, 1-bit CS with per-worker Φ, DaQuSGD's samples...): their
aggregate is not a sum of what clients send; and server-side DP, which clips each client's update.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fl_sim.strategies.gridproxy import GridProxy
from fl_sim.wire import keys
from fl_sim.wire.protocol import load_params
from fl_sim.wire.records import flatten_arrays, unflatten_into
from fl_sim.wire.secagg import (
    MASKED, RECORD, SecAggKey as K, Stage, field_bits, from_field, neighbours, prg_mask, resolve_counts,
)

__all__ = ["SecAggPlusGrid", "SecAggError", "SUMMABLE_CODECS", "check_summable", "check_strategy", "SECAGG_DEFAULTS"]

log = logging.getLogger("fl_sim")

# Codecs whose server-side aggregate is the weighted sum of the float tensors the clients send.
SUMMABLE_CODECS = ("identity", "count_sketch", "cs_fiht")  # and onebit_cs with a common Φ (check_summable)

# Flower's SecAggPlusWorkflow defaults (max_weight, clipping_range, quantization_range, modulus_range).
SECAGG_DEFAULTS: dict[str, Any] = {"max_weight": 1000.0, "clipping_range": 8.0, "quantization_range": 4194304,
                                   "modulus_range": 4294967296, "timeout": None}

_WHY = {
    "qsgd": "stochastic quantization with per-client norms", "topk": "per-client sparse indices",
    "randk": "per-client random indices", "sign": "per-client signs and scales",
    "terngrad": "per-client ternary levels and scales", "qcs": "per-client quantized measurements",
"fp16": "half-precision values",
    "rlc": "per-client codewords of the analog/digital channel", "dataq": "quantized data samples",
}


class SecAggError(RuntimeError):
    """A SecAgg+ round that cannot complete (too few clients or shares)."""


def check_summable(codec: str | None, method: str = "this method", params: dict | None = None) -> None:
    """Raise a one-line ValueError when ``codec``'s server must decode each client's payload (``params``:
    the codec's parameters; 1-bit CS is summable with a common Φ only)."""
    if codec is None or codec in SUMMABLE_CODECS:
        return
    if codec == "onebit_cs":
        if (params or {}).get("phi") == "common":
            return
        raise ValueError(f"secure aggregation cannot run {method} (codec 'onebit_cs') with phi='per_worker': its "
                         "server decodes each client's payload (one Φ per worker, one recovery each), but SecAgg+ "
                         "reveals only the sum; set phi: common")
    why = _WHY.get(codec, "a payload that is not summed as it is sent")
    raise ValueError(
        f"secure aggregation cannot run {method} (codec {codec!r}): its server decodes each client's payload "
        f"({why}), but SecAgg+ reveals only the sum; use a linear method (FedAvg/FedSGD, FetchSGD, Count "
        f"Sketch + EF, FIHT-CS, OneBitCS with phi: common) or turn secagg off")


def check_server_dp(strategy: Any) -> None:
    """Refuse server-side DP (Flower's ``DifferentialPrivacyServerSide*``) around or inside ``strategy``: it
    clips each client's update, and under SecAgg+ the server holds only their sum."""
    for s in (strategy, getattr(strategy, "inner", None)):
        name = type(s).__name__
        if s is not None and name.startswith("DifferentialPrivacyServerSide"):
            raise ValueError(f"secure aggregation cannot run under {name}: server-side DP clips each client's update "
                             "and SecAgg+ gives the server only their sum; clip on the clients instead")


def check_strategy(strategy: Any) -> None:
    """Refuse, in one line, an fl-sim method whose aggregate is not the sum of what its clients send."""
    check_server_dp(strategy)
    name = type(strategy).__name__
    if getattr(strategy, "channel", None) is not None or name in ("DaQuSGD", "RLCOverTheAir"):
        raise ValueError(f"secure aggregation cannot run {name}: its server reads each client's reply (samples, "
                         "codewords over the channel); SecAgg+ reveals only the sum")
    codec = getattr(strategy, "codec_name", None)
    if codec is not None and codec != "identity" and not getattr(strategy, "aggregate_compressed", True):
        raise ValueError(f"secure aggregation cannot run {name} with aggregate_compressed=false: it decodes "
                         "each client")
    check_summable(codec, name, getattr(strategy, "codec_params", None))


@dataclass
class _Round:
    msgs: dict[int, Message]  # sid -> the original train message
    cids: dict[int, int]
    nbrs: dict[int, set[int]]
    pks: dict[int, tuple[bytes, bytes]]
    up_bits: dict[int, int]  # protocol bits each client sent (keys, shares, field expansion)
    down_bits: dict[int, int]
    parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("keys", "shares", "expansion", "unmask"), 0))

    def sent(self, sid: int, part: str, bits: int) -> None:
        """Count ``bits`` of protocol traffic client ``sid`` sent, under ``part``."""
        self.up_bits[sid] += bits
        self.parts[part] += bits


class SecAggPlusGrid(GridProxy):
    """A Grid proxy: train messages go through SecAgg+; everything else is passed on unchanged.

    Args (Flower's names and meanings, SecAggPlusWorkflow):
        grid: the grid to wrap.
        strategy: the fl-sim strategy driving the rounds (optional): its ``round_extras`` gets the
            protocol's figures (``secagg_*`` columns of metrics.csv) and ``uplink_bits`` / ``clients_ok``
            counted over the clients whose vectors were summed.
        num_shares: neighbours per client including itself (int), or a fraction of the sampled clients.
        reconstruction_threshold: t (int), or a fraction of num_shares.
        max_weight: W, the largest n_i expected (weights are sent as n_i / W).
        clipping_range: c, entries of (n_i / W) · x are clipped to ±c.
        quantization_range: T, levels of the fixed-point encoding.
        modulus_range: M, the field size (a power of 2; K · T < M is checked each round).
        timeout: seconds each stage waits (passed to the wrapped grid).
        on_failure: "raise" (SecAggError) or "skip" (the round has no reply).
    """

    def __init__(self, grid: Grid, strategy: Any = None, *, num_shares: int | float = 1.0,
                 reconstruction_threshold: int | float = 0.5, max_weight: float = 1000.0,
                 clipping_range: float = 8.0, quantization_range: int = 4194304,
                 modulus_range: int = 4294967296, timeout: float | None = None, on_failure: str = "raise") -> None:
        super().__init__(grid)
        self.strategy = strategy
        check_params(num_shares, reconstruction_threshold, max_weight, clipping_range, quantization_range,
                     modulus_range, timeout, on_failure)
        self.num_shares, self.reconstruction_threshold = num_shares, reconstruction_threshold
        self.max_weight, self.clipping_range = float(max_weight), float(clipping_range)
        self.quantization_range, self.modulus_range = int(quantization_range), int(modulus_range)
        self.timeout, self.on_failure = timeout, on_failure
        self.rng = random.Random(0 if strategy is None else getattr(strategy, "seed", 0))
        # The strategy's per-client size table (reply guards) would cap the round's one aggregate reply as if
        # it were one client's; under SecAgg+ the table bounds the sum instead (_check_weight_sum).
        guards = getattr(strategy, "guards", None)
        self.client_sizes = guards.get("client_sizes") if isinstance(guards, dict) else None
        if self.client_sizes is not None:
            strategy.guards = {**guards, "client_sizes": None}
        self.last: dict[str, float] = {}

    # ---- the protocol ----------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.grid.send_and_receive(messages, timeout=timeout)
        try:
            return self._secure_round(messages)
        except SecAggError as exc:
            self._report({"secagg_failed": 1.0, "clients_ok": 0, "uplink_bits": 0})
            if self.on_failure == "skip":
                log.error("SecAgg+ round failed, skipped (global model unchanged): %s", exc)
                return []
            raise

    def _exchange(self, out: dict[int, Message]) -> dict[int, Message]:
        """Send one message per secure id; the replies without error, by secure id."""
        replies = self.grid.send_and_receive(list(out.values()), timeout=self.timeout)
        got: dict[int, Message] = {}
        for r in replies:
            if r.has_error():
                log.warning("SecAgg+: a client dropped out (node %d: %s)", r.metadata.src_node_id, r.error.reason)
                continue
            rec = r.content.get(RECORD)
            sid = int(rec[K.SID]) if isinstance(rec, ConfigRecord) and K.SID in rec else None
            if sid not in out or sid in got or r.metadata.src_node_id != out[sid].metadata.dst_node_id:
                log.warning("SecAgg+: a reply from node %d names no secure id sent to it; ignored",
                            r.metadata.src_node_id)
                continue
            got[sid] = r
        return got

    def _stage_msg(self, rd: _Round, sid: int, record: ConfigRecord, content: RecordDict | None = None) -> Message:
        base = rd.msgs[sid]
        record[keys.CID] = rd.cids[sid]
        record[K.SID] = sid
        body = RecordDict(dict(content.items())) if content is not None else RecordDict()
        body[RECORD] = record
        return Message(content=body, message_type=MessageType.TRAIN, dst_node_id=base.metadata.dst_node_id,
                       group_id=base.metadata.group_id)

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        t0 = time.perf_counter()
        configs = [_train_config(m) for m in messages]
        codec = configs[0].get(keys.CODEC) if configs[0] is not None else None
        check_summable(None if codec is None else str(codec), type(self.strategy).__name__
                       if self.strategy is not None else "this method",
                       load_params(str(configs[0].get(keys.CODEC_PARAMS, ""))) if configs[0] is not None else None)
        check_server_dp(self.strategy)
        n = len(messages)
        if n < 2:
            raise SecAggError(f"{n} client sampled; secure aggregation needs at least 2")
        shares, t = resolve_counts(self.num_shares, self.reconstruction_threshold, n)
        if n * self.quantization_range >= self.modulus_range:
            raise SecAggError(f"{n} clients x quantization_range {self.quantization_range} reach modulus_range "
                              f"{self.modulus_range}: the sum would wrap; lower quantization_range or raise "
                              "modulus_range")
        order = list(range(1, n + 1))
        self.rng.shuffle(order)
        rd = _Round(msgs={s: m for s, m in zip(order, messages)},
                    cids={s: int(c.get(keys.CID, i)) if c is not None else i
                          for i, (s, c) in enumerate(zip(order, configs))},
                    nbrs=neighbours(order, shares), pks={}, up_bits={s: 0 for s in order},
                    down_bits={s: 0 for s in order})
        timing: dict[str, float] = {}

        # 1. setup
        t1 = time.perf_counter()
        setup = {K.SHARE_NUMBER: shares, K.THRESHOLD: t, K.CLIPPING_RANGE: self.clipping_range,
                 K.TARGET_RANGE: self.quantization_range, K.MOD_RANGE: self.modulus_range,
                 K.MAX_WEIGHT: self.max_weight,
                 K.WEIGHT_KEY: getattr(self.strategy, "weighted_by_key", keys.NUM_EXAMPLES)}
        got = self._exchange({s: self._stage_msg(rd, s, ConfigRecord({K.STAGE: Stage.SETUP, K.SID: s, **setup}))
                              for s in order})
        for s, r in got.items():
            rec = r.content[RECORD]
            rd.pks[s] = (bytes(rec[K.PK1]), bytes(rec[K.PK2]))
            rd.sent(s, "keys", 8 * (len(rd.pks[s][0]) + len(rd.pks[s][1])))
        u1 = set(got)
        self._need(u1, rd, t, "setup")
        timing["secagg_setup_s"] = time.perf_counter() - t1

        # 2. share keys
        t1 = time.perf_counter()
        out = {}
        for s in sorted(u1):
            nb = sorted(rd.nbrs[s] & u1)
            out[s] = self._stage_msg(rd, s, ConfigRecord({K.STAGE: Stage.SHARE_KEYS, K.SIDS: nb,
                                                          K.PK1S: [rd.pks[j][0] for j in nb],
                                                          K.PK2S: [rd.pks[j][1] for j in nb]}))
            rd.down_bits[s] += sum(8 * (len(rd.pks[j][0]) + len(rd.pks[j][1])) for j in nb)
        got = self._exchange(out)
        fwd: dict[int, tuple[list[int], list[bytes]]] = {s: ([], []) for s in got}
        for s, r in got.items():
            rec = r.content[RECORD]
            for dst, ct in zip(rec[K.DSTS], rec[K.CTXTS], strict=True):
                rd.sent(s, "shares", 8 * len(ct))
                if int(dst) in fwd and int(dst) in rd.nbrs[s]:
                    fwd[int(dst)][0].append(s)
                    fwd[int(dst)][1].append(bytes(ct))
        u2 = set(got)
        self._need(u2, rd, t, "share_keys")
        timing["secagg_share_keys_s"] = time.perf_counter() - t1

        # 3. collect masked vectors (the clients train here)
        t1 = time.perf_counter()
        out = {}
        for s in sorted(u2):
            srcs, cts = fwd[s]
            out[s] = self._stage_msg(rd, s, ConfigRecord({K.STAGE: Stage.COLLECT_MASKED_VECTORS, K.SRCS: srcs,
                                                          K.CTXTS: cts}), rd.msgs[s].content)
            rd.down_bits[s] += sum(8 * len(c) for c in cts)
        got = self._exchange(out)
        M = self.modulus_range
        total = None
        layout = None
        payload_bits: dict[int, int] = {}
        clipped = 0  # entries the clients clipped to ±c (a bias the bound does not cover)
        for s, r in got.items():
            y = r.content[MASKED]["y"].numpy().astype(np.int64)
            rec = r.content[RECORD]
            others = {k: dict(v) for k, v in r.content.items()
                      if isinstance(v, ConfigRecord) and k not in (RECORD, keys.PAYLOAD_META)}
            this = (list(rec[K.NAMES]), str(rec[K.SHAPES]), list(rec[K.DTYPES]), str(rec[K.HAS_LOSS]), y.size,
                    json.dumps(others, sort_keys=True, default=str))
            if layout is None:
                layout, meta_sid = this, s
            elif this != layout:
                raise SecAggError(f"client {rd.cids[s]} sent a masked vector of another layout (or other reply "
                                  f"records) than client {rd.cids[meta_sid]}")
            total = y if total is None else (total + y) % M
            payload_bits[s] = int(r.content[keys.METRICS].get(keys.UPLINK_BITS, 0))
            clipped += int(r.content[keys.METRICS].get(K.CLIPPED, 0))
            rd.sent(s, "expansion", field_bits(M) * y.size - payload_bits[s])
        u3 = set(got)
        self._summed = u3
        got_masked = got
        self._need(u3, rd, t, "collect_masked_vectors")
        timing["secagg_collect_s"] = time.perf_counter() - t1

        # 4. unmask
        t1 = time.perf_counter()
        dead = u2 - u3
        out = {s: self._stage_msg(rd, s, ConfigRecord({K.STAGE: Stage.UNMASK,
                                                       K.ACTIVE: sorted(rd.nbrs[s] & u3),
                                                       K.DEAD: sorted(rd.nbrs[s] & dead)})) for s in sorted(u3)}
        got = self._exchange(out)
        collected: dict[int, list[bytes]] = {}
        for s, r in got.items():
            rec = r.content[RECORD]
            for owner, share in zip(rec[K.SHARE_OWNERS], rec[K.SHARES], strict=True):
                collected.setdefault(int(owner), []).append(bytes(share))
                rd.sent(s, "unmask", 8 * len(share))
        for j in sorted(u3 | dead):
            have = collected.get(j, [])
            if len(have) < t:
                raise SecAggError(f"{len(have)} shares of client {rd.cids[j]}'s "
                                  f"{'self-mask seed' if j in u3 else 'mask key'} came back, fewer than the "
                                  f"threshold t={t}; the round's sum cannot be unmasked")
            secret = combine_shares(have[:t])
            if j in u3:
                total = (total - prg_mask(secret, M, total.size)) % M
                continue
            sk1 = bytes_to_private_key(secret)
            for i in sorted(rd.nbrs[j] & u3):  # the survivors that masked with j
                mask = prg_mask(generate_shared_key(sk1, bytes_to_public_key(rd.pks[i][0])), M, total.size)
                # i added +mask when i > j, −mask when i < j: undo it
                total = (total - mask) % M if i > j else (total + mask) % M
        timing["secagg_unmask_s"] = time.perf_counter() - t1

        reply = self._aggregate_reply(rd, total, layout, got_masked[meta_sid], meta_sid, len(u3))
        k = len(u3)
        self._report({
            "clients_ok": k, "uplink_bits": sum(payload_bits[s] for s in u3),
            "secagg_bits": sum(rd.up_bits.values()),
            "secagg_bits_per_client": sum(rd.up_bits[s] for s in u3) / k,
            "secagg_down_bits": sum(rd.down_bits.values()),
            **{f"secagg_{name}_bits": float(v) for name, v in rd.parts.items()},
            "secagg_dropped": n - k, "secagg_clipped": clipped, "secagg_neighbours": shares, "secagg_threshold": t,
            **timing, "secagg_s": time.perf_counter() - t0,
        })
        return [reply]

    def _check_weight_sum(self, weight_sum: int, cids: list[int]) -> None:
        """Σ n_i against the clients' known sizes (simulation): a larger sum means some client overstated its
        weight; SecAgg+ cannot tell which, so it is logged, not corrected."""
        if self.client_sizes is None:
            return
        sizes = self.client_sizes
        known = sum(float(sizes[c]) for c in cids if 0 <= c < len(sizes))
        if weight_sum > known:
            log.error("SecAgg+: the clients' weights sum to %d, more than their known sizes (%d): a client "
                      "overstates its num-examples; secure aggregation cannot tell which", weight_sum, int(known))

    def _need(self, alive: set[int], rd: _Round, t: int, stage: str) -> None:
        if len(alive) < max(t, 2):
            raise SecAggError(f"after {stage}, {len(alive)} of {len(rd.msgs)} clients remain, fewer than the "
                              f"threshold t={t}")

    def _aggregate_reply(self, rd: _Round, total: np.ndarray, layout, meta_msg: Message, sid: int, k: int) -> Message:
        names, shapes_json, dtypes, loss_key, size, _ = layout
        weight_sum = int(total[-1])  # Σ n_i, exact
        self._check_weight_sum(weight_sum, [rd.cids[s] for s in rd.msgs if s in self._summed])
        sums = from_field(total[:-1], k, self.clipping_range, self.quantization_range)
        scale = self.max_weight / weight_sum if weight_sum > 0 else 0.0
        mean = sums * scale  # W Σ v̂_i / Σ n_i
        loss = float(mean[-1]) if loss_key else None
        values = mean[:-1] if loss_key else mean
        base = rd.msgs[sid]
        cfg = _train_config(base)
        default = getattr(self.strategy, "arrayrecord_key", keys.ARRAYS)
        wanted = str(cfg.get(keys.ARRAYRECORD_KEY, default)) if cfg is not None else default
        metrics = MetricRecord({getattr(self.strategy, "weighted_by_key", keys.NUM_EXAMPLES): weight_sum,
                                keys.M_CID: rd.cids[sid]})
        if loss is not None:
            metrics[loss_key] = loss
        content = RecordDict()
        if names:  # the payload tensors' weighted mean, in their own dtypes
            shapes = json.loads(shapes_json)
            out, offset = {}, 0
            for name, shape, dtype in zip(names, shapes, dtypes):
                size_i = int(np.prod(shape)) if shape else 1
                out[name] = Array(values[offset:offset + size_i].numpy().astype(dtype).reshape(shape))
                offset += size_i
            meta = ConfigRecord(dict(meta_msg.content[keys.PAYLOAD_META]))
            meta[keys.P_CID] = rd.cids[sid]
            content[wanted] = ArrayRecord(out)
            content[keys.PAYLOAD_META] = meta
            metrics[keys.UPLINK_BITS] = int(meta[keys.P_BITS])
        else:  # a model update: w + Δ̄
            model = base.content.get(wanted)
            if not isinstance(model, ArrayRecord):
                raise SecAggError(f"the train message has no model under {wanted!r} to add the mean update to")
            content[wanted] = unflatten_into(model, flatten_arrays(model) + values.to(torch.float32))
        content[keys.METRICS] = metrics
        for name, record in meta_msg.content.items():  # the clients' other reply records (all equal: checked)
            if isinstance(record, ConfigRecord) and name not in (RECORD, keys.PAYLOAD_META):
                content[name] = record
        return Message(content, reply_to=base)

    def _report(self, figures: dict[str, float]) -> None:
        self.last = dict(figures)
        if self.strategy is not None:
            self.strategy.round_extras = dict(figures)


def _train_config(msg: Message) -> ConfigRecord | None:
    return next((v for v in msg.content.values() if isinstance(v, ConfigRecord) and keys.SEED in v), None)


def check_params(num_shares, reconstruction_threshold, max_weight, clipping_range, quantization_range,
                 modulus_range, timeout, on_failure) -> None:
    """One-line ValueErrors for impossible SecAgg+ settings."""
    for name, v in (("num_shares", num_shares), ("reconstruction_threshold", reconstruction_threshold)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}={v!r}: an int (a count) or a float in (0, 1] (a fraction)")
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"{name}={v}: a fraction must be in (0, 1]; give a count as an int")
        if isinstance(v, int) and v < 2:
            raise ValueError(f"{name}={v}: a count must be >= 2")
    if not max_weight > 0 or not clipping_range > 0:
        raise ValueError(f"max_weight={max_weight}, clipping_range={clipping_range}: both must be > 0")
    if int(quantization_range) < 2 or int(modulus_range) <= int(quantization_range):
        raise ValueError(f"quantization_range={quantization_range}, modulus_range={modulus_range}: need "
                         "2 <= quantization_range < modulus_range")
    if int(modulus_range) & (int(modulus_range) - 1) or int(modulus_range) > 2**62:
        raise ValueError(f"modulus_range={modulus_range}: a power of 2 up to 2**62")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout={timeout}: seconds > 0, or null (wait as the grid does)")
    if on_failure not in ("raise", "skip"):
        raise ValueError(f"on_failure={on_failure!r}: 'raise' (stop the run) or 'skip' (keep the model, go on)")
