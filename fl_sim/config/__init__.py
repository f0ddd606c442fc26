"""The run configuration layer: YAML -> typed, validated ``RunConfig``; ``--set a.b=value`` overrides.

Job: the dataclasses every other layer reads (``RunConfig`` and its sections), loading and
validating them with one-line errors, and the name tables they are checked against
(``registry``). It may import the kernels (``fl_sim.compression``, ``fl_sim.data``,
``fl_sim.models``) and ``fl_sim.rng``; never Flower, the strategies, clients, engine or runs.
The Flower halves, the engine and the runs layer import it.
"""

from fl_sim.config.schema import (
    AUTO_SUPERNODES,
    BACKENDS,
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    SimulationConfig,
    StrategyConfig,
    TrainConfig,
    apply_overrides,
    config_dir,
    config_from_dict,
    config_to_dict,
    load_config,
    packaged_config,
    validate,
)

__all__ = [
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "StrategyConfig",
    "SimulationConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "packaged_config",
    "config_dir",
    "validate",
    "AUTO_SUPERNODES",
    "BACKENDS",
]
