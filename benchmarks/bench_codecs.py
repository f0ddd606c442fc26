"""Moved to fl_sim.bench.bench_codecs (installed with fl-sim, for `fl-sim bench`); kept so `python -m benchmarks.bench_codecs` works."""

from fl_sim.bench.bench_codecs import *  # noqa: F401,F403
from fl_sim.bench.bench_codecs import main as _main

if __name__ == "__main__":
    _main()
