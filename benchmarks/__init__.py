"""fl-sim benchmark scripts (not tests): ``python -m fl_sim.bench.bench_codecs [--quick]`` or ``fl-sim bench codecs``.

Each module has ``run(quick=False)`` returning its measurements and ``main(argv)`` that prints a table and
writes JSON. Run from the repository root.
"""
