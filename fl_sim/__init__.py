"""fl-sim: federated-learning simulation on Flower for communication-efficient and wireless FL.

Layers (imports go one way): ``compression`` and ``channels`` are pure tensor math (no flwr);
``data`` and ``models`` build datasets and torch models; ``strategies`` and ``clients`` are the
Flower glue; ``config``, ``app``, ``simulation``, ``results`` and ``cli`` drive runs.
"""

__version__ = "0.1.0"
