"""Moved to fl_sim.bench.bench_round (installed with fl-sim, for `fl-sim bench`); kept so `python -m benchmarks.bench_round` works."""

from fl_sim.bench.bench_round import *  # noqa: F401,F403
from fl_sim.bench.bench_round import main as _main

if __name__ == "__main__":
    _main()
