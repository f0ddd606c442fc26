"""The data section of a run config: where the data comes from and how it is split over clients.

It lives with the data layer (which reads it) so that the config layer above imports it, never the
other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """Where the data comes from and how it is split over clients.

    name: ``synthetic`` (FedProx/LEAF Synthetic(alpha, beta)), ``digits`` (scikit-learn's bundled 8x8
    digits), ``mnist``, ``fashion_mnist``, ``cifar10`` (torchvision on-disk files under ``root``),
    or ``hf:<dataset>`` (Hugging Face through flwr-datasets; a local path to a parquet/arrow file or a
    dataset directory also works as ``hf:/path/to/file.parquet``).
    partition: ``auto`` (natural for synthetic, dirichlet otherwise), ``iid``, ``dirichlet``,
    ``shards``, ``pathological``, ``natural``, ``size`` (power-law / linear sizes).
    """

    name: str = "synthetic"
    root: str = "data"
    partition: str = "auto"
    alpha: float = 0.5  # Dirichlet concentration (smaller = more label skew)
    shards_per_client: int = 2  # shards partitioner: shards (of one class each) per client
    classes_per_client: int = 2  # pathological partitioner
    size_distribution: str = "power_law"  # size partitioner: power_law | linear | square_root | exponential
    min_partition_size: int = 0
    test_fraction: float = 0.2  # held-out share when the source has no test split
    # Share of the training rows held out (seeded, per label) as a server-side validation set before the
    # partition; > 0 adds val_loss/val_accuracy to metrics.csv (tuning without the test set: fl-sim compare).
    validation: float = 0.0
    # Synthetic(alpha, beta) of Li et al. (FedProx) / LEAF:
    synthetic_alpha: float = 1.0  # model heterogeneity
    synthetic_beta: float = 1.0  # feature heterogeneity
    synthetic_dim: int = 60
    synthetic_classes: int = 10
    synthetic_iid: bool = False
    # Hugging Face columns
    feature_key: str = "auto"
    label_key: str = "auto"
    max_samples: int = 0  # 0 = all; >0 caps the training set (quick experiments)
