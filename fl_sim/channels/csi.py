"""Channel state information at the nodes: what node i believes its gains h_i are.

Source: [Abdi-thesis], Chapter 5, §5.3 ("we assume that the channel state
information and hence h_i is known at node i"); eq. (5.6) inverts h_i on the used subchannels.

* ``"perfect"``:   ĥ_i = h_i (the thesis' assumption).
* ``"imperfect"``: ĥ_i = h_i + e_i, e_i ~ CN(0, error_var I) per complex dimension (absolute, i.e. not
  relative to |h|²; it models a pilot-based estimate with error variance σ²/P_pilot), drawn from
  ``torch_generator(seed, "csi", round, i)``: a fresh estimate every round.

Nodes select subchannels and invert with ĥ; the channel applies the true h. With imperfect CSI the
effective gain h ⊙ q_i = h/ĥ on a used subchannel is no longer 1, so the over-the-air sum carries a
multiplicative error and (1/c) Aᵀ y is no longer exactly unbiased.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fl_sim.rng import torch_generator
from fl_sim.channels.fading import node_list
from fl_sim.channels.noise import ChannelError, complex_awgn

__all__ = ["CSI_MODES", "estimate_csi"]

CSI_MODES = ("perfect", "imperfect")


def estimate_csi(
    h: torch.Tensor,
    *,
    mode: str,
    error_var: float = 0.0,
    seed: int,
    round: int,
    nodes: int | Sequence[int],
) -> torch.Tensor:
    """ĥ (complex, same shape (n, m) as ``h``): h itself, or h + CN(0, error_var) per node and round."""
    if mode not in CSI_MODES:
        raise ChannelError(f"csi={mode!r} is unknown; use 'perfect' or 'imperfect'")
    if not (math.isfinite(error_var) and error_var >= 0):
        raise ChannelError(f"csi_error_var={error_var!r} must be a finite number >= 0")
    ids = node_list(nodes)
    if h.dim() != 2 or h.shape[0] != len(ids):
        raise ChannelError(f"h must have shape (n_nodes={len(ids)}, m), got {tuple(h.shape)}")
    if mode == "perfect" or error_var == 0:
        return h
    m = h.shape[1]
    e = torch.stack(
        [complex_awgn((m,), noise_var=error_var, generator=torch_generator(seed, "csi", round, i), dtype=h.dtype)
         for i in ids]
    )
    return h + e
