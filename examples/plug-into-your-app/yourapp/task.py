"""Model and data of the example app: scikit-learn's bundled digits, split over the nodes."""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def load_partition(partition_id: int, num_partitions: int):
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(y))[partition_id::num_partitions]
    return torch.tensor(x[idx] / 16.0, dtype=torch.float32), torch.tensor(y[idx])


def train(model: nn.Module, x, y, lr: float, epochs: int = 1) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            opt.step()
    return float(loss)


@torch.no_grad()
def test(model: nn.Module, x, y) -> tuple[float, float]:
    out = model(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
