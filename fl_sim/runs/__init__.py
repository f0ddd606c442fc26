"""Runs: one config from build to result files.

Job: build the experiment (data, model, strategy) from a config (``build``), run it on the engine's
grids with checkpoints and resume (``simulation``, ``inmemory``, ``checkpoint``), and own the run
directory and its files (``rundir``: locking and refusal; ``results``: metrics.csv, summary.json,
plots). It may import every layer below (kernels, ``config``, ``wire``, ``strategies``, ``clients``,
``engine``); never ``experiments``, the CLI or the App entry points.
"""
