"""Moved to fl_sim.bench.bench_transforms (installed with fl-sim, part of `fl-sim bench codecs`)."""

from fl_sim.bench.bench_transforms import *  # noqa: F401,F403
from fl_sim.bench.bench_transforms import main as _main

if __name__ == "__main__":
    _main()
