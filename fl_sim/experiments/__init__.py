"""Experiments: many runs and what they conclude.

Job: parameter sweeps (``sweep``), the method comparison suite (``compare``) and the papers'
reproductions (``reproduce``), each as its experiment spec, the runner that executes its runs through
``fl_sim.runs``, and the report that turns run directories into tables and figures. It may import
``fl_sim.runs`` and every layer below; never the CLI or the benchmarks.
"""
