"""Federated datasets: one shared training array, clients as index lists, a held-out test set.

``load_federated(cfg, num_clients, seed)`` loads the source (sources.py: synthetic, digits,
torchvision files, Hugging Face) and splits it with flwr-datasets' partitioners (partition.py).
Clients hold int64 index arrays into the shared (X, Y); a client's tensors are sliced only when it is
sampled (``client_data``), so 100,000 clients cost their index lists and nothing else. Clients left
without data (Dirichlet with small α) are reported by ``describe()`` and left out of
``eligible_clients``; the simulation samples only those. Everything is reproducible from the seed.

Layer: kernels. May import ``fl_sim.rng``, torch, numpy, scikit-learn, flwr-datasets' partitioners; never
Flower's runtime or any other fl_sim layer (its config section, ``DataConfig``, lives here in ``spec``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from fl_sim.data.spec import DataConfig
from fl_sim.data.errors import DataError
from fl_sim.data.partition import partition_indices
from fl_sim.data.sources import Source, load_source
from fl_sim.data.validation import hold_out_validation

__all__ = ["FederatedData", "DataError", "Source", "load_federated"]

log = logging.getLogger(__name__)


@dataclass
class FederatedData:
    """A source plus one index array per client.

    source: the shared arrays (``source.x`` (N, *input_shape) float32, ``source.y`` (N,) int64) and the
    test set; parts[c]: int64 rows of client c (disjoint, possibly empty); partition: how they were made.
    """

    source: Source
    parts: list[np.ndarray]
    partition: str = ""
    _sizes: np.ndarray | None = field(default=None, init=False, repr=False)

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
        """(num_clients,) int64 training samples per client (0 for empty clients)."""
        if self._sizes is None:
            self._sizes = np.fromiter((len(p) for p in self.parts), dtype=np.int64, count=len(self.parts))
        return self._sizes.copy()

    @property
    def eligible_clients(self) -> np.ndarray:
        """Ids of the clients with at least one training sample, ascending."""
        return np.flatnonzero(self.client_sizes > 0)

    def client_data(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (n_c, *input_shape) float32, y (n_c,) int64) of client ``cid``, sliced on demand."""
        c = int(cid)
        if not 0 <= c < len(self.parts):
            raise DataError(f"client id {cid} out of range: there are {len(self.parts)} clients (0..{len(self.parts) - 1})")
        idx = torch.from_numpy(self.parts[c])
        return self.source.x[idx], self.source.y[idx]

    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out test set (x, y) for centralized evaluation."""
        return self.source.x_test, self.source.y_test

    def validation_data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The validation set held out of the training rows (``data.validation`` > 0), else None."""
        if self.source.y_val is None:
            return None
        return self.source.x_val, self.source.y_val

    def label_histograms(self) -> np.ndarray:
        """(num_clients, num_classes) int64 training samples per client and label."""
        sizes = self.client_sizes
        owner = np.repeat(np.arange(len(self.parts)), sizes)
        rows = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        labels = self.source.y.numpy()[rows]
        flat = np.bincount(owner * self.num_classes + labels, minlength=len(self.parts) * self.num_classes)
        return flat.reshape(len(self.parts), self.num_classes).astype(np.int64)

    def describe(self) -> dict:
        """Summary for reports: sizes, empty clients, label skew.

        label_entropy_bits: mean over non-empty clients of H(p_c) = −Σ_j p_cj log2 p_cj, p_c the client's
        label distribution (log2 C for a uniform mix, 0 for one label); mean_majority_label_share: mean of
        max_j p_cj. Pooled values of the whole training set are given for comparison.
        """
        sizes = self.client_sizes
        keep = sizes > 0
        nz = sizes[keep]
        hist = self.label_histograms()[keep].astype(np.float64)
        p = hist / np.maximum(nz, 1)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ent = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
        pooled = np.bincount(self.source.y.numpy(), minlength=self.num_classes) / max(len(self.source.y), 1)
        pooled_ent = float(-(pooled[pooled > 0] * np.log2(pooled[pooled > 0])).sum())
        return {
            "name": self.name,
            "partition": self.partition,
            "clients": int(len(sizes)),
            "train_samples": int(sizes.sum()),
            "test_samples": int(len(self.source.y_test)),
            "validation_samples": int(len(self.source.y_val)) if self.source.y_val is not None else 0,
            "empty_clients": int((~keep).sum()),
            "size_mean": float(nz.mean()) if len(nz) else 0.0,
            "size_min": int(nz.min()) if len(nz) else 0,
            "size_max": int(nz.max()) if len(nz) else 0,
            "label_entropy_bits": float(ent.mean()) if len(nz) else 0.0,
            "pooled_label_entropy_bits": pooled_ent,
            "mean_majority_label_share": float(p.max(axis=1).mean()) if len(nz) else 0.0,
            "pooled_majority_label_share": float(pooled.max()),
        }


def load_federated(cfg: DataConfig, num_clients: int, seed: int) -> FederatedData:
    """Source + partition for ``num_clients`` clients, reproducible from ``seed``.

    Raises DataError when the files are missing, the partition does not fit the source, or no client
    gets any data. Some empty clients are allowed (reported by ``describe()``); more than half logs a
    warning. Whether enough are left for the clients sampled per round is the caller's check.
    """
    if num_clients < 1:
        raise DataError(f"num_clients={num_clients}: need at least one client")
    src = load_source(cfg, num_clients, seed)
    if cfg.validation > 0:
        hold_out_validation(src, cfg.validation, seed)
    parts = partition_indices(src, cfg, num_clients, seed)
    kind = cfg.partition if cfg.partition != "auto" else ("natural" if src.natural_ids is not None else "dirichlet")
    fd = FederatedData(src, parts, kind)
    empty = num_clients - len(fd.eligible_clients)
    if empty == num_clients:
        raise DataError(
            f"every one of the {num_clients} clients is empty after partition {kind}; use fewer clients or a larger data.alpha"
        )
    if empty > num_clients // 2:
        log.warning("%d of %d clients have no data (partition %s); they are never sampled", empty, num_clients, kind)
    return fd
