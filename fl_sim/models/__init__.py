"""Torch models by name: logreg, mlp, lenet5, cifarnet, resnet18 (CIFAR variant).

``build_model(name, input_shape, num_classes, *, hidden=[200], seed=0)`` initialises under a forked
torch RNG (``torch.random.fork_rng``) seeded with ``seed``: the same seed gives the same initial
weights, and building a model never moves the caller's global torch RNG.

Parameter counts for 10 classes: logreg 610 on (60,); mlp [200] 14,210 on (60,); lenet5 61,706 on
(1, 28, 28) and (1, 8, 8), 62,006 on (3, 32, 32); cifarnet 1,068,298 on (3, 32, 32) ([Abdi-thesis]
Ch. 3: "CifarNet ... 1.07 million parameters"); resnet18 11,173,962 on (3, 32, 32).

Layer: kernels. May import torch only; never Flower or any other fl_sim layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["build_model", "count_parameters", "MODEL_NAMES", "LeNet5", "CifarNet", "ResNet18"]

MODEL_NAMES = ("logreg", "mlp", "lenet5", "cifarnet", "resnet18")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998): conv6-5x5, ReLU, pool/2, conv16-5x5, ReLU, pool/2, fc120, fc84, fc C.

    The classic network sees 32x32 inputs and reaches a 16x5x5 feature map: 32x32 inputs (CIFAR) get
    unpadded convolutions, 28x28 MNIST gets conv1 padding 2 (the usual way of feeding MNIST to it).
    Smaller inputs (8x8 digits) also pad conv2 so the map never shrinks below 1x1; an adaptive average
    pool then brings any map to 5x5 (the identity on the classic sizes), so fc1 always has 400 inputs
    and the parameter count does not depend on the input size.
    """

    def __init__(self, in_channels: int, num_classes: int, height: int) -> None:
        super().__init__()
        pad1 = 0 if height >= 32 else 2
        after1 = math.ceil((height + 2 * pad1 - 4) / 2)  # conv1 then pool/2 (ceil mode)
        pad2 = 0 if after1 >= 10 else 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarNet(nn.Module):
    """CifarNet (TensorFlow's CIFAR-10 tutorial network, TF-slim ``cifarnet``): conv64-5x5 'same', ReLU,
    pool 3x3/2, LRN, conv64-5x5 'same', ReLU, LRN, pool 3x3/2, fc384, fc192, fc C.

    The tutorial trains on 24x24 crops, which leave a 6x6x64 map before fc384: 1,068,298 parameters
    for 10 classes, the 1.07M of [Abdi-thesis]. Here the full 32x32 image (or any size) is used and an
    adaptive average pool fixes that map at 6x6, keeping the 1.07M. LRN: size 4 window, α = 0.001/9,
    β = 0.75, k = 1 (the tutorial's ``depth_radius=4``, bias 1).
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


class _BasicBlock(nn.Module):
    """ResNet basic block: y = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)); a 1x1 conv + BN
    shortcut when the stride or width changes (He et al. 2016, option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR (He et al. 2016): 3x3/1 stem conv64 + BN + ReLU (no 7x7 conv, no max-pool),
    four stages of two basic blocks (64, 128, 256, 512 channels; stride 2 from the second stage),
    global average pool, fc C. Same layers and parameter count as torchvision's ``resnet18`` with its
    stem replaced (11,173,962 for 10 classes), without importing torchvision. Weights use PyTorch's
    default initialisation of each layer."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks: list[nn.Module] = []
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def _mlp(input_dim: int, widths: Sequence[int], num_classes: int) -> nn.Module:
    """Flatten, then Linear + ReLU per hidden width, then a Linear to the classes (no hidden = logreg)."""
    dims = [input_dim, *widths]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], num_classes))
    return nn.Sequential(*layers)


def build_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, hidden: Sequence[int] | None = None, seed: int = 0
) -> nn.Module:
    """A freshly initialised model (deterministic from ``seed``; the global torch RNG is left untouched).

    name: one of MODEL_NAMES; input_shape: one sample's shape, (F,) or (C, H, W) (the image models need
    (C, H, W)); hidden: mlp widths (default [200]).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape {tuple(input_shape)} must be a non-empty tuple of positive sizes")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    widths = [200] if hidden is None else [int(h) for h in hidden]
    if any(h < 1 for h in widths):
        raise ValueError(f"hidden={list(hidden or [])}: layer widths must be >= 1")
    if name in ("lenet5", "cifarnet", "resnet18") and len(shape) != 3:
        raise ValueError(
            f"model {name!r} needs image input (channels, height, width), got input shape {shape}; "
            "use logreg or mlp for flat features"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "logreg":
            return _mlp(math.prod(shape), [], num_classes)
        if name == "mlp":
            return _mlp(math.prod(shape), widths, num_classes)
        if name == "lenet5":
            return LeNet5(shape[0], num_classes, min(shape[1:]))
        if name == "cifarnet":
            return CifarNet(shape[0], num_classes)
        return ResNet18(shape[0], num_classes)
