"""Moved to fl_sim.bench.plain_loop (installed with fl-sim, for `fl-sim bench`)."""

from fl_sim.bench.plain_loop import *  # noqa: F401,F403
