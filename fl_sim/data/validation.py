"""A validation set held out from the training rows (``data.validation``), for tuning without the test set.

``hold_out_validation(src, fraction, seed)`` moves a seeded, label-stratified share ``fraction`` of the
training rows of ``src`` into ``src.x_val, src.y_val`` *before* the rows are partitioned over clients, so
no client trains on a validation row and the test set is untouched. Per label c with n_c training rows,
round(fraction * n_c) rows are drawn (at least one row of every label stays for training); for sources
with natural clients (Synthetic) the kept rows keep their owner, so every client loses about the same
share. The server evaluates the global model on it (``val_loss``/``val_accuracy`` columns of
metrics.csv) beside the test set; a tuner that reads only the ``val_*`` columns cannot fit the test set.
"""

from __future__ import annotations

import numpy as np
import torch

from fl_sim.rng import numpy_generator
from fl_sim.data.errors import DataError
from fl_sim.data.sources import Source

__all__ = ["hold_out_validation"]


def hold_out_validation(src: Source, fraction: float, seed: int) -> Source:
    """Move a stratified share ``fraction`` of ``src``'s training rows into its validation set (in place)."""
    if not 0 < fraction < 1:
        raise DataError(f"data.validation={fraction}: the held-out share must be in (0, 1)")
    y = src.y.numpy()
    rng = numpy_generator(seed, "validation-split")
    order = rng.permutation(len(y))  # a random order, then the first round(f * n_c) rows of each label
    labels = y[order]
    rank = np.empty(len(y), dtype=np.int64)  # rank of each row (in `order`) among the rows of its label
    by_label = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=src.num_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[by_label] = np.arange(len(y)) - np.repeat(starts, counts)
    take = np.minimum(np.rint(fraction * counts), np.maximum(counts - 1, 0)).astype(np.int64)
    val_mask = np.zeros(len(y), dtype=bool)
    val_mask[order] = rank < take[labels]
    if not val_mask.any():
        raise DataError(f"data.validation={fraction} holds out no row of {len(y)}; use a larger share")
    keep = np.flatnonzero(~val_mask)
    val = np.flatnonzero(val_mask)
    kt, vt = torch.from_numpy(keep), torch.from_numpy(val)
    src.x_val, src.y_val = src.x[vt], src.y[vt]
    src.x, src.y = src.x[kt], src.y[kt]
    if src.natural_ids is not None:
        src.natural_ids = src.natural_ids[keep]
    return src
