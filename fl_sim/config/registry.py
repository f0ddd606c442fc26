"""Name tables the config validates against and the layers above resolve: strategy names.

``strategy.name`` in a config -> ``"module:Class"`` of the Flower strategy that implements it. The
table is plain data, so the config layer can check a name without importing the Flower strategies
(which sit above it); ``fl_sim.strategies.strategy_class`` imports the class on first use, so one
method's module never breaks another. The kernels keep their own registries (codecs in
``fl_sim.compression``, data sources and partitions in ``fl_sim.data``, models in ``fl_sim.models``).
"""

from __future__ import annotations

__all__ = ["STRATEGIES"]

STRATEGIES: dict[str, str] = {
    "fedavg": "fl_sim.strategies.fedavg:FedAvgBaseline",
    "fedsgd": "fl_sim.strategies.fedavg:FedSGD",
    "compressed": "fl_sim.strategies.compressed:CompressedFedAvg",
    "qcs": "fl_sim.strategies.qcs:QCS",
    "onebit_cs": "fl_sim.strategies.onebit:OneBitCS",
    "fetchsgd": "fl_sim.strategies.fetchsgd:FetchSGD",
    "fiht_cs": "fl_sim.strategies.fihtcs:FIHTCS",
    "daqusgd": "fl_sim.strategies.daqusgd:DaQuSGD",
    "rlc": "fl_sim.strategies.rlc:RLCOverTheAir",
}
