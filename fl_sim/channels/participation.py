"""Random participation b_i ~ Bernoulli(π_i) with 1/π_i compensation, and data weights α_i = n_i/n.

Source: [Abdi-thesis], Chapter 5: §5.2 (F(θ) = Σ_i α_i f_i(θ), α_i = n_i/n
for unbalanced data) and §5.4.2, eq. (5.10): x_i = c α_i (b_i/π_i)(m/m_i)(q_i ⊙ (A g_i)). Because
E[b_i/π_i] = 1 the decoder (1/c) Aᵀ y stays unbiased; the power of a transmitting node grows by
1/π_i² (1/π_i on average over b_i).

b_i is drawn from ``torch_generator(seed, "participation", round, i)``: node i's decision never
depends on which other nodes are asked in the same round.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.channels.fading import node_list
from fl_sim.channels.noise import ChannelError

__all__ = ["draw_participation", "participation_scale", "data_weights", "check_probabilities"]


def check_probabilities(pi: torch.Tensor) -> torch.Tensor:
    """π as float64; raises ChannelError unless every π_i is in (0, 1]."""
    pi = torch.as_tensor(pi, dtype=torch.float64)
    if not bool(((pi > 0) & (pi <= 1)).all()):
        raise ChannelError(f"participation probabilities must lie in (0, 1], got {pi.tolist()}")
    return pi


def draw_participation(
    pi: torch.Tensor | float, *, seed: int, round: int, nodes: int | Sequence[int]
) -> torch.Tensor:
    """b (bool, shape (n,)): b_i = 1 with probability π_i (π a scalar or one value per node)."""
    ids = node_list(nodes)
    pi = check_probabilities(torch.as_tensor(pi, dtype=torch.float64).expand(len(ids)))
    u = torch.tensor(
        [torch.rand(1, generator=torch_generator(seed, "participation", round, i), dtype=torch.float64).item()
         for i in ids],
        dtype=torch.float64,
    )
    return u < pi


def participation_scale(b: torch.Tensor, pi: torch.Tensor | float) -> torch.Tensor:
    """b_i / π_i (float64, shape (n,)): zero for idle nodes, 1/π_i for transmitting ones (eq. 5.10)."""
    b = torch.as_tensor(b)
    pi = check_probabilities(torch.as_tensor(pi, dtype=torch.float64).expand(b.shape))
    return b.to(torch.float64) / pi


def data_weights(n_samples: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """α_i = n_i / n with n = Σ_i n_i (float64, shape (K,)); raises for negative counts or n = 0."""
    n = torch.as_tensor(n_samples, dtype=torch.float64)
    if n.dim() != 1 or not bool((n >= 0).all()) or not bool(torch.isfinite(n).all()):
        raise ChannelError(f"n_samples must be a 1-D sequence of counts >= 0, got {n.tolist()}")
    total = n.sum()
    if total <= 0:
        raise ChannelError("n_samples sum to 0: at least one node must hold data")
    return n / total
