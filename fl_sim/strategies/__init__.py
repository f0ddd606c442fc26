"""Flower Message-API strategies: each method wraps an inner ``flwr.serverapp.strategy.Strategy``
(FedAvg when none is given), ``QCS(FedAdam(...), k=128, levels=4)``.

``build_strategy(cfg, ...)`` maps ``strategy.name`` of a run config onto a class through the
registry ``STRATEGIES`` (the name table of ``fl_sim.config.registry``); ``strategy.options`` become keyword arguments, so a typo is an error.

Layer: the server half of Flower. May import the kernels, ``fl_sim.config`` and ``fl_sim.wire``;
never ``clients``, ``engine``, ``runs`` or above.
"""

from __future__ import annotations

import importlib
from typing import Any

from fl_sim.config.registry import STRATEGIES
from fl_sim.strategies.base import ClientReply, ReplyError, UpdateStrategy
from fl_sim.strategies.compressed import CompressedFedAvg
from fl_sim.strategies.fedavg import FedAvgBaseline, FedSGD
from fl_sim.strategies.waves import WaveGrid

__all__ = ["UpdateStrategy", "ClientReply", "ReplyError", "CompressedFedAvg", "FedAvgBaseline", "FedSGD", "STRATEGIES",
           "WaveGrid", "QCS", "OneBitCS", "FetchSGD", "FIHTCS", "DaQuSGD", "RLCOverTheAir", "strategy_class"]

# class name -> config name, for `from fl_sim.strategies import QCS` (derived: one line per method above)
_PUBLIC = {target.partition(":")[2]: name for name, target in STRATEGIES.items()}


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    mod, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(mod), cls)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return strategy_class(_PUBLIC[name])
    raise AttributeError(f"module 'fl_sim.strategies' has no attribute {name!r}")
