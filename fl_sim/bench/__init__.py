"""Benchmarks: every figure in docs/performance.md comes from a module here, run as ``fl-sim bench ...``.

Job: codec speed (``bench_codecs``) and fidelity (``bench_codec_fidelity``), round and population
timings against a plain PyTorch loop (``bench_round``, ``bench_scale``, ``plain_loop``), recovery and
transform speed, the client encoding stage (``bench_encoding``), flat memory over a long run
(``bench_memory_flat``), FIHT-CS against Count Sketch error feedback (``fiht_vs_sketch_ef``), the Ray
profile; and the README's poisoning figures (``bench_poisoning``: accuracy under attack, not speed). Each prints its figures and ratios measured side by side in one run, writes JSON, has
``main(argv)`` and ``--smoke`` (tiny sizes), and a smoke test in the suite (tests/test_bench_smoke.py). It may import every layer below the CLI (``runs``, ``experiments`` and down);
never the CLI itself.
"""
