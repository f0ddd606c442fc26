"""The engine: the grids that carry a round's messages, and what keeps them fast and bounded.

Job: the in-process grids (``inline.InMemoryGrid``: every message a function call;
``vectorized.VectorizedGrid``: one batched call per cohort), Flower's Ray simulation engine behind
one call (``ray``), the indexed LinkState poll swapped in during simulations (``flower_poll``), and
memory estimates checked before a run allocates (``memory``). It may import the kernels, ``config``,
``wire`` and the two Flower halves (``strategies``, ``clients``); never ``runs``, ``experiments``,
the CLI or the App entry points.
"""
