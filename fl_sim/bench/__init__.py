"""Benchmarks: every figure in docs/performance.md comes from a module here, run as ``fl-sim bench ...``.

Job: codec speed (``bench_codecs``), round and population timings against a plain PyTorch loop
(``bench_round``, ``bench_scale``, ``plain_loop``), recovery and transform speed, the Ray profile.
Each prints its figures and ratios measured side by side in one run and has a smoke test at tiny
sizes in the suite. It may import every layer below the CLI (``runs``, ``experiments`` and down);
never the CLI itself.
"""
