"""The wire both Flower halves share: record keys, payload <-> record conversion, the codec protocol.

Job: what crosses between a strategy and a client mod, defined once: the ConfigRecord /
MetricRecord / ArrayRecord key names (``keys``), converting tensors and codec payloads to Flower
records and back with size checks before allocation (``records``), and the per-round codec
parameters and seeds both sides derive (``protocol``). It may import ``fl_sim.compression``,
``fl_sim.rng`` and Flower's record classes; never the strategies, clients or anything above.
"""
