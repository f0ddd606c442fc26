"""Data sources by name: one shared training array (X, Y), a held-out test set, and for generated
federations the natural client of every training row. Nothing is ever downloaded.

Sources (``data.name``):
    synthetic       FedProx Synthetic(α, β) (synthetic.py), natural clients
    digits          scikit-learn's bundled 8x8 digits: 1,797 images in [0, 1], (1, 8, 8), 10 classes;
                    seeded stratified test split of ``test_fraction``
    mnist, fashion_mnist, cifar10
                    torchvision's on-disk files under ``data.root`` (files.py)
    hf:<dataset>    Hugging Face via flwr-datasets, or a local file / saved dataset (hf.py)
``data.max_samples > 0`` keeps a seeded random subset of that many training rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fl_sim.data.spec import DataConfig
from fl_sim.rng import numpy_generator
from fl_sim.data.errors import DataError
from fl_sim.data.files import MNIST_STATS, load_cifar10, load_mnist_like
from fl_sim.data.synthetic import feature_bytes, generate_synthetic

__all__ = ["Source", "DataError", "load_source", "SOURCES"]


@dataclass
class Source:
    """A loaded data set.

    x (N, *input_shape) float32, the one shared training array; y (N,) int64 labels in [0, num_classes);
    x_test, y_test the held-out test set; natural_ids (N,) int64 natural client of each training row
    (None when the source has no natural clients).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    natural_ids: np.ndarray | None = None
    x_val: torch.Tensor | None = None  # validation rows held out of x (data.validation; validation.py)
    y_val: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])


def meminfo_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _synthetic(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    need = feature_bytes(num_clients, seed, cfg.synthetic_dim)
    avail = meminfo_available_bytes()
    if avail is not None and need > 0.8 * avail:
        raise DataError(
            f"synthetic data for {num_clients} clients x dim {cfg.synthetic_dim} needs about {need / 2**30:.1f} GiB, "
            f"only {avail / 2**30:.1f} GiB is available; use fewer clients or a smaller data.synthetic_dim"
        )
    d = generate_synthetic(
        num_clients, seed, alpha=cfg.synthetic_alpha, beta=cfg.synthetic_beta, dim=cfg.synthetic_dim,
        classes=cfg.synthetic_classes, iid=cfg.synthetic_iid, test_fraction=cfg.test_fraction,
    )
    return Source("synthetic", d.x_train, d.y_train, d.x_test, d.y_test, cfg.synthetic_classes, natural_ids=d.owner_train)


def _digits(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values 0..16
    y = data.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=cfg.test_fraction, random_state=int(numpy_generator(seed, "digits-split").integers(2**31)), stratify=y
    )
    return Source("digits", *(torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, ytr, xte, yte)), 10)


def _mnist_like(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    return Source(cfg.name, *load_mnist_like(cfg.name, cfg.root), 10)


def _cifar10(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    return Source("cifar10", *load_cifar10(cfg.root), 10)


def _huggingface(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    from fl_sim.data.hf import load_hf

    return Source(cfg.name, *load_hf(cfg, seed))


SOURCES: dict[str, Callable[[DataConfig, int, int], Source]] = {
    "synthetic": _synthetic,
    "digits": _digits,
    **{name: _mnist_like for name in MNIST_STATS},
    "cifar10": _cifar10,
}


def load_source(cfg: DataConfig, num_clients: int, seed: int) -> Source:
    """The source named by ``cfg.name`` (``hf:`` prefix: Hugging Face), capped at ``cfg.max_samples``."""
    loader = _huggingface if cfg.name.startswith("hf:") else SOURCES.get(cfg.name)
    if loader is None:
        raise DataError(f"unknown data.name {cfg.name!r}; use {', '.join(SOURCES)} or hf:<dataset>")
    src = loader(cfg, num_clients, seed)
    if len(src.y) == 0:
        raise DataError(f"{cfg.name} has no training samples")
    if cfg.max_samples and len(src.y) > cfg.max_samples:
        keep = np.sort(numpy_generator(seed, "max-samples").permutation(len(src.y))[: cfg.max_samples])
        t = torch.from_numpy(keep)
        src.x, src.y = src.x[t], src.y[t]
        if src.natural_ids is not None:
            src.natural_ids = src.natural_ids[keep]
    return src
