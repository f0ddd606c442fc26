"""Test helpers for users' own strategies and apps (a stable public path).

``InMemoryGrid(client_app, num_nodes)`` drives any Flower strategy by calling ClientApps directly
(no Ray, no processes; fl_sim.engine.inline); ``run_in_memory(cfg)`` runs a whole fl-sim config on
it (fl_sim.runs.inmemory); ``round_replies(cfg, grid_factory)`` records each round's replies of a
grid. This module only re-exports them: it sits above the engine and runs
layers and nothing in the package imports it.
"""

from fl_sim.engine.inline import InMemoryGrid
from fl_sim.runs.inmemory import round_replies, run_in_memory

__all__ = ["InMemoryGrid", "run_in_memory", "round_replies"]
