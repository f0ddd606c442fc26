"""Baselines: FedAvg ([McMahan-2017]) and FedSGD-style update averaging with a server optimizer.

Both send the full float32 model down and up (uplink bits = 32 d per client). ``FedAvgBaseline``
averages the client models weighted by sample count (η_s = 1, μ = 0 in :class:`UpdateStrategy`);
``FedSGD`` averages the updates and takes a server step ``w ← w + η_s m``, ``m ← μ m + Δ̄``
(Reddi et al. 2021 "Adaptive Federated Optimization", FedAvgM of [Hsu-2019]). With one local
step per client it is FedSGD.
"""

from __future__ import annotations

from fl_sim.strategies.base import UpdateStrategy

__all__ = ["FedAvgBaseline", "FedSGD"]


class FedAvgBaseline(UpdateStrategy):
    """FedAvg: w ← Σ_i (n_i/n) w_i over the sampled clients (uncompressed)."""


class FedSGD(UpdateStrategy):
    """Update averaging with a server learning rate and momentum (uncompressed)."""
