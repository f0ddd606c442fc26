"""The run configuration layer: YAML -> typed, validated ``RunConfig``; ``--set a.b=value`` overrides.

Job: the dataclasses every other layer reads (``RunConfig`` and its sections), loading and
validating them with one-line errors, and the name tables they are checked against
(``registry``). It may import the kernels (``fl_sim.compression``, ``fl_sim.data``,
``fl_sim.models``) and ``fl_sim.rng``; never Flower, the strategies, clients, engine or runs.
The Flower halves, the engine and the runs layer import it.
"""

from fl_sim.config import schema as _schema
from fl_sim.config.schema import *  # noqa: F403 - the public names, schema.__all__
from fl_sim.config.schema import AUTO_SUPERNODES, BACKENDS, validate

__all__ = [*_schema.__all__, "validate", "AUTO_SUPERNODES", "BACKENDS"]
