"""Federated datasets: one shared training array, clients as index lists, a held-out test set.

``load_federated(cfg, num_clients, seed)`` builds the source (fl_sim.data.sources) and the partition
(fl_sim.data.partition, flwr-datasets' partitioners). A client's tensors are sliced only when it is
sampled (``client_data``); 100,000 clients cost their index lists and nothing else. Clients left
without data (Dirichlet with small α) are reported by ``describe()`` and excluded from
``eligible_clients``; the simulation samples only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig
from .partition import partition_indices
from .sources import DataError, Source, load_source

__all__ = ["FederatedData", "DataError", "load_federated"]


@dataclass
class FederatedData:
    source: Source
    parts: list[np.ndarray]

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.source.input_shape

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def client_sizes(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))

    @property
    def eligible_clients(self) -> np.ndarray:
        """Client ids with at least one training sample."""
        return np.flatnonzero(self.client_sizes > 0)

    def client_data(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of one client, sliced from the shared arrays on demand."""
        if not 0 <= int(cid) < len(self.parts):
            raise DataError(f"client id {cid} out of range: there are {len(self.parts)} clients")
        idx = torch.from_numpy(self.parts[int(cid)])
        return self.source.x[idx], self.source.y[idx]

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source.x_test, self.source.y_test

    def label_histograms(self) -> np.ndarray:
        """(num_clients, num_classes) sample counts per label."""
        y = self.source.y.numpy()
        owner = np.repeat(np.arange(len(self.parts)), self.client_sizes)
        flat = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        hist = np.zeros((len(self.parts), self.num_classes), dtype=np.int64)
        np.add.at(hist, (owner, y[flat]), 1)
        return hist

    def describe(self) -> dict:
        sizes = self.client_sizes
        nz = sizes[sizes > 0]
        hist = self.label_histograms()
        share = hist.max(axis=1)[sizes > 0] / nz if len(nz) else np.zeros(0)
        return {
            "name": self.name,
            "clients": int(len(sizes)),
            "train_samples": int(sizes.sum()),
            "test_samples": int(len(self.source.y_test)),
            "empty_clients": int((sizes == 0).sum()),
            "size_mean": float(nz.mean()) if len(nz) else 0.0,
            "size_min": int(nz.min()) if len(nz) else 0,
            "size_max": int(nz.max()) if len(nz) else 0,
            "mean_majority_label_share": float(share.mean()) if len(share) else 0.0,
        }


def load_federated(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Source + partition for ``num_clients`` clients, reproducible from ``seed``."""
    src = load_source(cfg, num_clients, seed)
    parts = partition_indices(src, cfg, num_clients, seed)
    fd = FederatedData(src, parts)
    if len(fd.eligible_clients) == 0:
        raise DataError(f"every one of the {num_clients} clients is empty; use fewer clients or a larger data.alpha")
    return fd
