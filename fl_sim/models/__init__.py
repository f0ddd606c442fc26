"""Torch models by name: logreg, mlp, lenet5, cifarnet, resnet18 (CIFAR variant).

``build_model(name, input_shape, num_classes, *, hidden=[200], seed=0)`` initialises under a local
RNG (``torch.random.fork_rng``), so building a model never moves the global torch RNG and the same
seed gives the same initial weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["build_model", "count_parameters", "MODEL_NAMES"]

MODEL_NAMES = ("logreg", "mlp", "lenet5", "cifarnet", "resnet18")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _flat(input_shape: tuple[int, ...]) -> int:
    return int(math.prod(input_shape))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv6-5x5, pool, conv16-5x5, pool, fc120, fc84, fc.

    Works for 1 or 3 channels and any input of at least 8x8: the convolutions pad to keep the
    spatial size ('same'), and an adaptive average pool brings the feature map to 5x5, so 28x28
    MNIST, 32x32 CIFAR and 8x8 digits share the architecture (61.7k parameters for 28x28x1, 10 classes).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarNet(nn.Module):
    """TF-slim CifarNet: conv64-5x5, pool3/2, LRN, conv64-5x5, LRN, pool3/2, fc384, fc192, fc.

    TF-slim trains it on 24x24 crops, whose last feature map is 6x6x64; an adaptive pool fixes it at
    6x6 for any input size, giving 1,068k parameters for 10 classes (Abdi thesis: CifarNet 1.07M).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(),
            nn.LocalResponseNorm(4, alpha=0.001 / 9.0, beta=0.75, k=1.0), nn.MaxPool2d(3, 2, padding=1),
            nn.AdaptiveAvgPool2d(6),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 36, 384), nn.ReLU(), nn.Linear(384, 192), nn.ReLU(), nn.Linear(192, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool): 11.17M parameters."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, *, hidden: list[int] | None = None, seed: int = 0
) -> nn.Module:
    """A freshly initialised model (deterministic from ``seed``, global RNG untouched)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    input_shape = tuple(int(s) for s in input_shape)
    image = len(input_shape) == 3
    if name in ("lenet5", "cifarnet", "resnet18") and not image:
        raise ValueError(
            f"model {name!r} needs image input (channels, height, width), got input shape {input_shape}; "
            "use logreg or mlp for flat features"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logreg":
            return nn.Sequential(nn.Flatten(), nn.Linear(_flat(input_shape), num_classes))
        if name == "mlp":
            widths = [_flat(input_shape), *(hidden if hidden is not None else [200])]
            layers: list[nn.Module] = [nn.Flatten()]
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(widths[-1], num_classes))
            return nn.Sequential(*layers)
        if name == "lenet5":
            return LeNet5(input_shape[0], num_classes)
        if name == "cifarnet":
            return CifarNet(input_shape[0], num_classes)
        return _resnet18(input_shape[0], num_classes)
