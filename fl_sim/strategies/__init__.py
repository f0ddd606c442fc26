"""Flower Message-API strategies: each method wraps an inner ``flwr.serverapp.strategy.Strategy``
(FedAvg when none is given), ``QCS(FedAdam(...), k=128, levels=4)``.

``build_strategy(cfg, ...)`` maps ``strategy.name`` of a run config onto a class through the
registry ``STRATEGIES``; ``strategy.options`` become keyword arguments, so a typo is an error.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import ClientReply, ReplyError, UpdateStrategy
from .compressed import CompressedFedAvg
from .fedavg import FedAvgBaseline, FedSGD
from .waves import WaveGrid

__all__ = ["UpdateStrategy", "ClientReply", "ReplyError", "CompressedFedAvg", "FedAvgBaseline", "FedSGD", "STRATEGIES",
           "WaveGrid", "QCS", "OneBitCS", "FetchSGD", "FIHTCS", "DaQuSGD", "RLCOverTheAir", "strategy_class"]

# config name -> "module:Class" (imported lazily so one method's module never breaks another)
STRATEGIES: dict[str, str] = {
    "fedavg": ".fedavg:FedAvgBaseline",
    "fedsgd": ".fedavg:FedSGD",
    "compressed": ".compressed:CompressedFedAvg",
    "qcs": ".qcs:QCS",
    "onebit_cs": ".onebit:OneBitCS",
    "fetchsgd": ".fetchsgd:FetchSGD",
    "fiht_cs": ".fihtcs:FIHTCS",
    "daqusgd": ".daqusgd:DaQuSGD",
    "rlc": ".rlc:RLCOverTheAir",
}

# class name -> config name, for `from fl_sim.strategies import QCS` (derived: one line per method above)
_PUBLIC = {target.partition(":")[2]: name for name, target in STRATEGIES.items()}


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    mod, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(mod, __name__), cls)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return strategy_class(_PUBLIC[name])
    raise AttributeError(f"module 'fl_sim.strategies' has no attribute {name!r}")
