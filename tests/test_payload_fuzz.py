"""Payload fuzz: random malformed and extreme replies through every strategy.

For each strategy, the honest replies of round 1 are computed once on the in-memory grid (real
ClientApp and mods); every hypothesis example then tampers some of them (metrics, arrays, payload
meta: NaN/inf, 3e38, wrong shapes and dtypes, out-of-range integers, an npy header of 2^40 values,
lying bit counts...) and runs ``aggregate_train`` of a fresh strategy on them. Asserted:

* the round completes (no exception) and every reply is accounted for (ok + failed = sent);
* the model stays finite;
* every reply that no well-formed client can send is counted as rejected;
* the norm guard holds: each reply the round used has its guarded norm within norm_bound x the
  round's median, and for full-model strategies ‖Δ̄‖ <= norm_bound x the largest honest ‖Δ_i‖.

Integers out of the codec's range are refused per reply by the decode of each reply (strategies that
decode every reply) or the codec's ``check_values``; where neither runs (payloads summed in the
compressed domain by a codec without check_values) the case is only asserted not to crash or poison.
"""

from __future__ import annotations

import copy
import io
import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sim.wire import keys
from fl_sim.runs.build import build_experiment, build_strategy
from fl_sim.clients.app import make_client_app
from fl_sim.compression import Codec, PayloadError
from fl_sim.config import config_from_dict
from fl_sim.wire.records import flatten_arrays, read_array
from fl_sim.strategies.base import SERVER_PREFIX
from fl_sim.testing import InMemoryGrid

K = 4
STRATEGIES = {
    "fedavg": ({"name": "fedavg"}, None, {}),
    "fedsgd": ({"name": "fedsgd", "server_momentum": 0.9}, None, {}),
    "identity": ({"name": "compressed"}, {"name": "identity"}, {}),
    "fp16": ({"name": "compressed"}, {"name": "fp16"}, {}),
    "topk": ({"name": "compressed", "error_feedback": "classic"}, {"name": "topk", "k": 20}, {}),
    "randk": ({"name": "compressed"}, {"name": "randk", "k": 20}, {}),
    "qsgd": ({"name": "compressed"}, {"name": "qsgd", "levels": 4}, {}),
    "sign": ({"name": "compressed"}, {"name": "sign"}, {}),
    "terngrad": ({"name": "compressed"}, {"name": "terngrad"}, {}),
    "qcs": ({"name": "qcs", "block": 64, "k": 16}, None, {}),
    "onebit_cs": ({"name": "onebit_cs", "compression": 2, "phi": "per_worker"}, None, {}),
    "fetchsgd": ({"name": "fetchsgd", "rows": 3, "cols": 64, "k": 40}, None, {}),
    "fiht_cs": ({"name": "fiht_cs", "compression": 4}, None, {}),
    "daqusgd": ({"name": "daqusgd", "bits_per_feature": 3}, None, {}),
    "rlc": ({"name": "rlc", "gain": 4, "diagnostics": True}, None, {"channel": {"snr_db": 20.0, "fading": "none"}}),
}
FULL_MODEL = {"fedavg", "fedsgd", "identity"}  # the applied update is the weighted mean of the replies' Δ_i


@lru_cache(maxsize=None)
def setting(name: str):
    """(experiment, honest replies of round 1 by node) of a strategy, computed once."""
    strategy, codec, over = STRATEGIES[name]
    raw = {"rounds": 1, "clients": K, "clients_per_round": K, "data": {"name": "synthetic", "partition": "natural"},
           "model": {"name": "mlp", "hidden": [8]}, "train": {"lr": 0.05, "batch_size": 16}, "strategy": strategy,
           **over}
    if codec:
        raw["codec"] = codec
    cfg = config_from_dict(json.loads(json.dumps(raw)))
    exp = build_experiment(cfg)
    s = build_strategy(exp)
    grid = InMemoryGrid(make_client_app(cfg), K)
    msgs = list(s.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(msgs)}
    assert len(replies) == K and not any(r.has_error() for r in replies.values())
    return exp, grid, replies


def big_header() -> Array:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    return Array(dtype="float32", shape=(2**40,), stype="numpy.ndarray", data=buf.getvalue() + b"\0" * 8)


# (kind, value): what a mutation does; BAD = no well-formed client sends it (must be counted)
METRIC_EDITS = [
    (keys.NUM_EXAMPLES, float("inf"), True), (keys.NUM_EXAMPLES, float("nan"), True), (keys.NUM_EXAMPLES, -1, True),
    (keys.NUM_EXAMPLES, 2.5, True), (keys.NUM_EXAMPLES, 1e18, False), (keys.NUM_EXAMPLES, 0, False),
    (keys.M_CID, float("nan"), True), (keys.M_CID, float("inf"), True), (keys.M_CID, -5, True),
    (keys.M_CID, 10**9, True), (keys.TRAIN_LOSS, [1.0, 2.0], True), (keys.TRAIN_LOSS, float("inf"), False),
    (keys.UPLINK_BITS, 2**62, False), (keys.UPLINK_BITS, 0, False),
]
ARRAY_EDITS = ["nan", "inf", "huge", "-huge", "tiny", "zero", "int-max", "int-min", "shape", "dtype", "header",
               "drop", "extra"]
BAD_ARRAY_EDITS = {"nan", "inf", "shape", "dtype", "header", "drop", "extra"}
INT_RANGE_EDITS = {"int-max", "int-min"}  # bad for every codec with integer tensors, refused by check_values
META_EDITS = [(keys.P_BITS, 0, False), (keys.P_BITS, 2**62, False), (keys.P_DIM, 3, True),
              (keys.P_CODEC, "nope", True), (keys.P_META, "{not json", True)]

mutation = st.one_of(
    st.tuples(st.just("metric"), st.integers(0, len(METRIC_EDITS) - 1)),
    st.tuples(st.just("array"), st.sampled_from(ARRAY_EDITS)),
    st.tuples(st.just("meta"), st.integers(0, len(META_EDITS) - 1)),
)


def edit_array(arrays: ArrayRecord, how: str, pick: int) -> tuple[bool, bool]:
    """Apply ``how`` to one array; (definitely bad, bad only by range) for what was done."""
    names = list(arrays.keys())
    name = names[pick % len(names)]
    try:
        nd = read_array(arrays[name], name)
    except PayloadError:  # already replaced by a bad header
        return True, False
    floating = np.issubdtype(nd.dtype, np.floating)
    if how in ("nan", "inf", "huge", "-huge", "tiny", "zero"):
        if not floating or nd.size == 0:
            return False, False
        value = {"nan": np.nan, "inf": np.inf, "huge": 3e38, "-huge": -3e38, "tiny": 1e-45, "zero": 0.0}[how]
        if nd.dtype == np.float16 and how in ("huge", "-huge"):
            value = 6e4 if how == "huge" else -6e4
        arrays[name] = Array(np.full(nd.shape, value, nd.dtype))
        return how in ("nan", "inf"), False
    if how in INT_RANGE_EDITS:
        if floating or nd.size == 0:
            return False, False
        info = np.iinfo(nd.dtype)
        arrays[name] = Array(np.full(nd.shape, info.max if how == "int-max" else info.min, nd.dtype))
        return False, not (how == "int-min" and info.min == 0)  # 0 is a valid level of unsigned codes
    if how == "shape":
        arrays[name] = Array(np.concatenate([nd.reshape(-1), nd.reshape(-1)[:1]]))
    elif how == "dtype":
        arrays[name] = Array(nd.astype(np.float64 if not nd.dtype == np.float64 else np.float32))
    elif how == "header":
        arrays[name] = big_header()
    elif how == "drop":
        del arrays[name]
        if not len(arrays):
            return True, False
    elif how == "extra":
        arrays["zz-extra"] = Array(np.zeros(3, np.float32))
    return True, False


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# at most K/2 of the K replies are tampered: median-based guards assume an honest majority (guards.py)
@given(edits=st.lists(st.tuples(st.integers(0, K // 2 - 1), st.integers(0, 7), mutation), min_size=1, max_size=3))
def test_fuzzed_replies_never_abort_or_poison(name, edits):
    exp, grid, honest = setting(name)
    s = build_strategy(exp)
    msgs = list(s.configure_train(1, exp.initial_arrays, ConfigRecord(), grid))
    nodes = [m.metadata.dst_node_id for m in msgs]
    contents = {node: copy.deepcopy(honest[node].content) for node in nodes}
    bad, ranged = set(), set()
    codec_checks = name == "daqusgd"  # integer ranges refused per reply: DaQuSGD's own checks, a decode per
    if hasattr(s, "codec_for"):          # reply (decodes_each), or the codec's check_values
        codec_checks = s.decodes_each() or \
            type(s.codec_for(s._global_vector.numel())).check_values is not Codec.check_values
    for which, pick, (kind, what) in edits:
        content = contents[nodes[which]]
        if kind == "metric":
            key, value, is_bad = METRIC_EDITS[what]
            content[keys.METRICS][key] = value
        elif kind == "array":
            is_bad, is_ranged = edit_array(content[keys.ARRAYS], what, pick)
            if is_ranged:
                ranged.add(which)
        else:
            if keys.PAYLOAD_META not in content:
                continue
            key, value, is_bad = META_EDITS[what]
            content[keys.PAYLOAD_META][key] = value
        if is_bad:
            bad.add(which)
    replies = [Message(content=contents[n], reply_to=m) for n, m in zip(nodes, msgs)]
    arrays, metrics = s.aggregate_train(1, replies)  # the round completes: no exception
    metrics = {k[len(SERVER_PREFIX):]: v for k, v in metrics.items() if k.startswith(SERVER_PREFIX)}  # server.<name>

    assert metrics["clients_ok"] + metrics["clients_failed"] == K
    assert metrics["clients_rejected"] >= len(bad)
    if codec_checks:
        assert metrics["clients_rejected"] >= len(bad | ranged)
    if arrays is not None:
        new = flatten_arrays(arrays)
        assert torch.isfinite(new).all()
        if name in FULL_MODEL:
            honest_norms = [float((flatten_arrays(honest[n].content[keys.ARRAYS]) - s._global_vector).double().norm())
                            for n in nodes]
            applied = float((new - s._global_vector).double().norm()) / s.server_lr
            if name == "fedsgd":
                applied = float(s.momentum_buffer.double().norm())
            assert applied <= s.guards["norm_bound"] * max(honest_norms) * (1 + 1e-5)
    # the norm guard, in the domain each strategy sums: no used reply beyond bound x median
    # (recomputed on the replies as the guard left them)
    kept = getattr(s, "_fuzz_kept", None)
    if kept:
        norms = torch.tensor([v for v in (s.reply_norm(r) for r in kept) if v is not None], dtype=torch.float64)
        if norms.numel() and bool((norms > 0).any()):
            median = float(norms[norms > 0].median())
            assert float(norms.max()) <= s.guards["norm_bound"] * median * (1 + 1e-5) + 1e-30


@pytest.fixture(autouse=True)
def _keep_guarded_replies(monkeypatch):
    """Record the replies apply_guards returns, for the norm-guard assertion above."""
    from fl_sim.strategies.base import UpdateStrategy

    real = UpdateStrategy.apply_guards

    def spy(self, server_round, usable):
        kept, counts = real(self, server_round, usable)
        self._fuzz_kept = list(kept)
        return kept, counts

    monkeypatch.setattr(UpdateStrategy, "apply_guards", spy)
