"""Subchannel gains h_i ∈ ℂ^m of the MAC (generate step; the MAC applies them).

Source: [Abdi-thesis], Chapter 5, eq. (5.1): y = Σ_i h_i ⊙ x_i + η with
h_i the gains of node i's m subchannels. The thesis fixes no fading law; this module offers the
usual ones, all normalised to E|h|² = 1 before large-scale path loss:

* ``"none"``:     h = 1.
* ``"rayleigh"``: h ~ CN(0, 1), so |h|² ~ Exp(1).
* ``"rician"``:   h = sqrt(K/(K+1)) + sqrt(1/(K+1)) w, w ~ CN(0, 1): a line-of-sight part of phase 0
  and a scattered part; E[h] = sqrt(K/(K+1)), Var h = 1/(K+1), K = |E h|² / Var h.

Block fading: node i's gains are drawn from ``torch_generator(seed, "fading", block, i)`` with
block = round // coherence_rounds, so they are constant for ``coherence_rounds`` consecutive rounds
and independent across blocks. Each node has its own generator, so node i's gains never depend on
which other nodes are drawn in the same call (client sampling changes nothing). The loop over nodes
only builds one generator per *sampled* node; each draws all m subchannels at once.

Large-scale path loss (optional, :class:`PathLoss`): power gain β_i = (d0/d_i)^exponent, with the
distance d_i drawn once per node (uniform over the area of the annulus between ``min_distance`` and
``max_distance``) from ``torch_generator(seed, "distance", i)``; h_i is multiplied by sqrt(β_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.channels.noise import ChannelError

__all__ = ["FADING_KINDS", "PathLoss", "draw_fading", "node_list"]

FADING_KINDS = ("none", "rayleigh", "rician")


def node_list(nodes: int | Sequence[int]) -> list[int]:
    """Node ids as a list of ints: ``n`` means nodes 0..n-1, a sequence is taken as given."""
    if isinstance(nodes, int):
        if nodes < 0:
            raise ChannelError(f"n_nodes={nodes} must be >= 0")
        return list(range(nodes))
    if isinstance(nodes, torch.Tensor):
        nodes = nodes.tolist()
    ids = [int(i) for i in nodes]
    if len(set(ids)) != len(ids):
        raise ChannelError(f"node ids must be distinct, got {ids}")
    return ids


@dataclass(frozen=True)
class PathLoss:
    """Distance-based large-scale power gain β_i = (d0 / d_i)^exponent.

    Attributes:
        exponent: path-loss exponent (2 free space, 3-4 urban).
        reference_distance: d0, the distance at which β = 1 (the SNR is defined there).
        min_distance, max_distance: node distances are uniform over the annulus area between them
            (d = sqrt(d_min² + U (d_max² − d_min²)), U ~ U(0, 1)), same units as d0.
    """

    exponent: float = 3.0
    reference_distance: float = 1.0
    min_distance: float = 1.0
    max_distance: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ChannelError(f"path_loss exponent={self.exponent!r} must be a finite number >= 0")
        if not (math.isfinite(self.reference_distance) and self.reference_distance > 0):
            raise ChannelError(f"reference_distance={self.reference_distance!r} must be > 0")
        if not (0 < self.min_distance <= self.max_distance < math.inf):
            raise ChannelError(
                f"need 0 < min_distance <= max_distance < inf, got {self.min_distance!r}, {self.max_distance!r}"
            )

    def distances(self, nodes: int | Sequence[int], *, seed: int) -> torch.Tensor:
        """d_i (float64, shape (n,)), one fixed draw per node id."""
        ids = node_list(nodes)
        u = torch.tensor([torch.rand(1, generator=torch_generator(seed, "distance", i), dtype=torch.float64).item()
                          for i in ids], dtype=torch.float64)
        lo2, hi2 = self.min_distance**2, self.max_distance**2
        return torch.sqrt(lo2 + u * (hi2 - lo2))

    def gains(self, nodes: int | Sequence[int], *, seed: int) -> torch.Tensor:
        """β_i = (d0 / d_i)^exponent (float64, shape (n,)): the power gain, E|h_i|² = β_i."""
        return (self.reference_distance / self.distances(nodes, seed=seed)) ** self.exponent


def draw_fading(
    kind: str,
    nodes: int | Sequence[int],
    m: int,
    *,
    seed: int,
    round: int,
    coherence_rounds: int = 1,
    rician_k: float = 1.0,
    path_loss: PathLoss | None = None,
) -> torch.Tensor:
    """Gains h (complex64, shape (n, m)) of m subchannels for each node of ``nodes``.

    Args:
        kind: ``"none"``, ``"rayleigh"`` or ``"rician"`` (see the module docstring).
        nodes: a count n (nodes 0..n-1) or a sequence of node ids.
        m: subchannels (channel uses) per node.
        seed: run seed; round: round index; coherence_rounds: rounds per fading block.
        rician_k: Rician factor K (linear, >= 0; K = 0 is Rayleigh).
        path_loss: optional large-scale power gain per node.
    """
    if kind not in FADING_KINDS:
        raise ChannelError(f"fading={kind!r} is unknown; use one of {', '.join(FADING_KINDS)}")
    if not isinstance(m, int) or m < 1:
        raise ChannelError(f"m={m!r} must be a positive int (subchannels per node)")
    if not isinstance(coherence_rounds, int) or coherence_rounds < 1:
        raise ChannelError(f"coherence_rounds={coherence_rounds!r} must be an int >= 1")
    if not (math.isfinite(rician_k) and rician_k >= 0):
        raise ChannelError(f"rician_k={rician_k!r} must be a finite number >= 0 (linear K factor)")
    ids = node_list(nodes)
    if kind == "none":
        h = torch.ones((len(ids), m), dtype=torch.complex64)
    else:
        block = int(round) // coherence_rounds
        w = torch.stack(
            [torch.randn((m, 2), generator=torch_generator(seed, "fading", block, i)) for i in ids]
        ) if ids else torch.zeros((0, m, 2))
        w = torch.view_as_complex(w * math.sqrt(0.5))  # CN(0, 1)
        if kind == "rician":
            w = math.sqrt(rician_k / (rician_k + 1.0)) + math.sqrt(1.0 / (rician_k + 1.0)) * w
        h = w.to(torch.complex64)
    if path_loss is not None and ids:
        h = h * path_loss.gains(ids, seed=seed).sqrt().to(torch.float32)[:, None]
    return h
