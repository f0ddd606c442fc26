"""The benchmarks behind ``fl-sim bench`` (codecs, round, scale) and the plain PyTorch loop they compare
against; installed with fl-sim. ``python -m fl_sim.bench.bench_scale --help`` runs one directly; the
scripts in the repository's benchmarks/ (memory, recovery, transforms) build on these."""
