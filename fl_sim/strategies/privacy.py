"""Differential privacy with a compressed uplink: Flower's DP wrappers and clipping mods, composed or refused.

Flower's central DP ([McMahan-DP-2018]; [Andrew-2021] for adaptive clipping) bounds each client's update Δ_i by a clipping norm C,
Δ_i ← Δ_i · min(1, C / ‖Δ_i‖₂) (FlatClip), and adds Gaussian noise N(0, σ² I) with σ = z C / m
(noise multiplier z, m sampled clients) to the aggregated model (flwr/serverapp/strategy/
dp_fixed_clipping.py, dp_adaptive_clipping.py). Its guarantee needs the aggregate's sensitivity to
one client to be C / m: every client's contribution, *as the server aggregates it*, has norm ≤ C.

With a method in between, that holds exactly where the server decodes every client (QCS,
``CompressedFedAvg`` with a codec it decodes per client, uncompressed ``FedAvgBaseline``/``FedSGD``):

* server-side clipping (``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``), *around* the
  method or *inside* it: Flower's clipping and noise run over the decoded models w + Δ̂_i, one per
  client. Inside (``QCS(DP(FedAvg(...)))``) that is the wrapper's ordinary path. Around
  (``DP(QCS(FedAvg(...)))``), Flower's wrapper would clip the replies it receives, which are encoded
  payloads (a broadcast error); the method adopts the wrapper instead (:func:`adopt`): the wrapper's
  ``aggregate_train`` becomes the method's, which decodes and then runs the wrapper's own
  ``aggregate_train`` (clipping, noise, adaptive norm update, accounting) over the inner strategy with
  the decoded per-client models;
* client-side clipping (``DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping`` + Flower's
  ``fixedclipping_mod``/``adaptiveclipping_mod``): the clipping mod clips Δ_i *before*
  ``compression_mod`` encodes it (``mods=[compression_mod, fixedclipping_mod]``; the other order is
  refused by the mod, naming this one). A codec may enlarge a vector (unbiased quantizers, QCS's
  rescaling: ‖decode(encode(x))‖ > ‖x‖), so the server clips each decoded Δ̂_i to the round's C again
  (:func:`clip_decoded`) before the wrapper adds noise: the sensitivity stays C / m.

Where the server never sees a client's update (compressed-domain methods: FIHT-CS, FetchSGD, RLC over
the air, 1-bit CS with a common Φ, a linear codec summed before decoding, DaQuSGD), nothing per client
can be clipped on the server, and Flower's noise on the recovered model is not calibrated to one
client's influence on it (the recovery is non-linear: hard thresholding, top-k, sign decoding): every
DP wrapper is refused there with :class:`PrivacyCompositionError` before the first message is sent.
So is fl-sim's own server step (``server_lr`` ≠ 1 or ``server_momentum`` > 0), which hands the inner
one aggregate model in place of the clients' models (use FedAvgM inside the DP wrapper instead).
docs/privacy.md has the table.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # what the clipping mods read

__all__ = ["DP_WRAPPERS", "PrivacyCompositionError", "adopt", "check_composition", "clip_decoded", "clip_factors",
           "enclosing_dp", "inner_dp", "outer_dp_aggregate", "unwrap_dp", "KEY_CLIPPING_NORM"]


SERVER_SIDE = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
CLIENT_SIDE = (DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping)
DP_WRAPPERS = SERVER_SIDE + CLIENT_SIDE


class PrivacyCompositionError(ValueError):
    """A DP wrapper around or inside a method where the combination would not mean what DP promises."""


def unwrap_dp(strategy: Strategy) -> Strategy:
    """The strategy that aggregates beneath any Flower DP wrappers (their ``.strategy``)."""
    while isinstance(strategy, DP_WRAPPERS):
        strategy = strategy.strategy
    return strategy


def inner_dp(inner: Strategy) -> Strategy | None:
    """The Flower DP wrapper a method wraps (``QCS(DP(FedAvg))``), or None."""
    return inner if isinstance(inner, DP_WRAPPERS) else None


def enclosing_dp(method: Strategy, depth: int = 12) -> Strategy | None:
    """The Flower DP wrapper whose ``configure_train`` is calling ``method.configure_train`` right now
    (``DP(QCS(...))``: its ``strategy`` is the method), found on the call stack; None if there is none.

    Flower's wrappers call ``self.strategy.configure_train(...)`` from their own ``configure_train``;
    nothing else tells a wrapped strategy that it is wrapped. Called from ``configure_train``.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, DP_WRAPPERS) and obj.strategy is method:
            return obj
    return None


def check_composition(method: Any, dp: Strategy | str, where: str) -> None:
    """Refuse ``dp`` (``where``: "around" or "inside"; a description for a DP setup of another make) with
    ``method`` where it cannot mean what it says."""
    name, dp_name = type(method).__name__, dp if isinstance(dp, str) else type(dp).__name__
    if not method.decodes_each_client():
        raise PrivacyCompositionError(
            f"{dp_name} {where} {name}: {name} aggregates in the compressed domain, so the server never sees one "
            f"client's update: nothing per client can be clipped and noise on the recovered model is not "
            f"calibrated to one client's influence. Use a method that decodes every client (QCS, "
            f"CompressedFedAvg with aggregate_compressed=False) for DP, or drop the DP wrapper (docs/privacy.md)"
        )
    if method.server_lr != 1.0 or method.server_momentum > 0:
        raise PrivacyCompositionError(
            f"{dp_name} {where} {name}: fl-sim's server step (server_lr={method.server_lr}, "
            f"server_momentum={method.server_momentum}) hands the inner strategy one aggregate, not each "
            f"client's model, so the wrapper could not clip per client; put FedAvgM inside the DP wrapper instead"
        )


def adopt(dp: Strategy, method: Any) -> None:
    """``DP(method)``: Flower's loop calls ``dp.aggregate_train`` with the clients' encoded replies; make that
    the method's ``aggregate_train`` (it decodes, then runs ``dp``'s own over its inner: see
    :func:`outer_dp_aggregate`). Set on this ``dp`` object only; idempotent."""
    if dp.__dict__.get("aggregate_train") != method.aggregate_train:
        dp.aggregate_train = method.aggregate_train


def outer_dp_aggregate(dp: Strategy, inner: Strategy, server_round: int, replies: list) -> tuple:
    """``dp``'s own ``aggregate_train`` (Flower's clipping, noise, clip-norm update, accounting) over
    ``inner`` on the decoded per-client ``replies``, ``dp.strategy`` being ``inner`` for the call."""
    wrapped = dp.strategy
    dp.strategy = inner
    try:
        return type(dp).aggregate_train(dp, server_round, replies)
    finally:
        dp.strategy = wrapped


def clip_factors(norms: torch.Tensor, clipping_norm: float) -> torch.Tensor:
    """Flower's FlatClip factors min(1, C / ‖Δ̂_i‖) (flwr.supercore.differential_privacy.clip_inputs_inplace)."""
    norms = norms.to(torch.float64)
    return torch.where(norms > clipping_norm, clipping_norm / norms, torch.ones_like(norms))


def clip_decoded(method: Any, replies: list, clipping_norm: float) -> int:
    """Clip each decoded reply's update Δ̂_i to ``clipping_norm`` (client-side DP: a codec may enlarge the
    clipped update). Returns how many were scaled down."""
    norms = torch.tensor([method.reply_norm(r) for r in replies], dtype=torch.float64)
    factors = clip_factors(norms, clipping_norm)
    for reply, f in zip(replies, factors.tolist()):
        if f < 1.0:
            method.scale_reply(reply, f)
    return int((factors < 1.0).sum())
