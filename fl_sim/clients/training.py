"""Local training and evaluation of a torch model on one client's tensors (no Flower here).

Minibatch SGD (optionally with momentum / weight decay) on cross-entropy, the FedAvg client update
of [McMahan-2017], Algorithm 1 ClientUpdate: E local epochs of B-sized batches, or a fixed
number of steps. Shuffling comes from a seeded ``torch.Generator`` so a round is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LocalTrainSpec", "batch_indices", "batch_matrix", "train_local", "evaluate_model", "per_sample_loss"]


@dataclass(frozen=True)
class LocalTrainSpec:
    """Hyperparameters of one client's local update."""

    lr: float
    batch_size: int
    local_epochs: int = 1
    local_steps: int = 0  # > 0 overrides local_epochs
    momentum: float = 0.0
    weight_decay: float = 0.0


def batch_indices(n: int, spec: LocalTrainSpec, generator: torch.Generator):
    """Yield index tensors: epochs of shuffled batches, or exactly ``local_steps`` batches.

    The one definition of a client's batch order (``train_local`` and the vectorized cohorts,
    fl_sim.clients.cohort, both read it), so both paths see the same batches from the same generator.
    """
    if spec.local_steps > 0:
        done = 0
        while done < spec.local_steps:
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, spec.batch_size):
                yield perm[start : start + spec.batch_size]
                done += 1
                if done == spec.local_steps:
                    return
    else:
        for _ in range(spec.local_epochs):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, spec.batch_size):
                yield perm[start : start + spec.batch_size]


def batch_matrix(n: int, spec: LocalTrainSpec, generator: torch.Generator) -> torch.Tensor:
    """The batches of :func:`batch_indices` as one tensor [steps, batch_size], short batches padded with -1.

    The same permutations drawn in the same order from ``generator`` (one per epoch; with ``local_steps``
    as many epochs as the steps need), built with tensor ops instead of one tensor per batch.
    """
    B = spec.batch_size
    per_epoch = -(-n // B)  # ceil(n / B)
    if n == 0:
        return torch.full((0, B), -1, dtype=torch.long)
    epochs = -(-spec.local_steps // per_epoch) if spec.local_steps > 0 else spec.local_epochs
    rows = torch.full((epochs, per_epoch * B), -1, dtype=torch.long)
    for e in range(epochs):
        rows[e, :n] = torch.randperm(n, generator=generator)
    rows = rows.view(-1, B)
    return rows[: spec.local_steps] if spec.local_steps > 0 else rows


def train_local(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: LocalTrainSpec, generator: torch.Generator
) -> float:
    """Train ``model`` in place; returns the mean training loss over the steps taken."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    total, steps = 0.0, 0
    for idx in batch_indices(len(y), spec, generator):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y)."""
    model.eval()
    if len(y) == 0:
        return float("nan"), float("nan")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = model(xb)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(dim=1) == yb).sum())
    return loss_sum / len(y), correct / len(y)


@torch.no_grad()
def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample (forward pass only), shape (n,)."""
    model.eval()
    return nn.functional.cross_entropy(model(x), y, reduction="none")
