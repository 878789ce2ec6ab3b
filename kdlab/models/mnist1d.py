"""The MNIST-1D baselines of Greydanus & Kobak (logistic, MLP, CNN, GRU), same shapes and sizes.

Layers are named modules (not functional calls) so feature taps can hook every stage; the
parameter counts equal those of the paper's models (410, 15,210, 5,210 and 5,134 for 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.registry import register_model

SIGNAL_LENGTH = 40


class MNIST1DLinear(nn.Module):
    """Logistic regression on the raw 40-sample signal."""

    feature_taps = ("fc",)

    def __init__(self, num_classes: int = 10, in_features: int = SIGNAL_LENGTH) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class ResidualMLPBlock(nn.Module):
    """``h + relu(W h + b)``: the second hidden layer of the paper's MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.act(self.linear(h))


class MNIST1DMLP(nn.Module):
    """Two hidden layers of 100 units, the second residual, as in the MNIST-1D paper."""

    feature_taps = ("layer1", "layer2")
    preact_taps = ("layer1.1:input",)

    def __init__(self, num_classes: int = 10, hidden: int = 100, in_features: int = SIGNAL_LENGTH) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU())
        self.layer2 = ResidualMLPBlock(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(x.flatten(1))))


class ResidualConvBlock(nn.Module):
    """``relu(h + conv(h))``: a stride-1 block that deepens a stage without changing its shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.relu(h + self.conv(h))


class MNIST1DCNN(nn.Module):
    """Three strided 1-D convolutions (25 channels) and a linear read-out, as in the paper.

    ``blocks`` > 1 deepens each stage with residual stride-1 blocks (as ResNet-110 deepens
    ResNet-20's three stages), for deep -> shallow pairs; ``blocks=1`` is the paper's CNN."""

    feature_taps = ("layer1", "layer2", "layer3", "flatten")

    def __init__(
        self, num_classes: int = 10, channels: int = 25, signal_length: int = SIGNAL_LENGTH, blocks: int = 1
    ) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")

        def stage(in_channels: int, kernel: int) -> nn.Sequential:
            deeper = [ResidualConvBlock(channels) for _ in range(blocks - 1)]
            return nn.Sequential(nn.Conv1d(in_channels, channels, kernel, stride=2, padding=1), nn.ReLU(), *deeper)

        self.layer1 = stage(1, 5)
        self.layer2 = stage(channels, 3)
        self.layer3 = stage(channels, 3)
        # Each stage's output before its last ReLU (AB and OFD match pre-activations).
        last = "1" if blocks == 1 else f"{blocks}.relu"
        self.preact_taps = tuple(f"layer{i}.{last}:input" for i in (1, 2, 3))
        self.flatten = nn.Flatten()
        length = signal_length
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.fc = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(x.reshape(x.shape[0], 1, -1))))
        return self.fc(self.flatten(h))


class MNIST1DGRU(nn.Module):
    """Bidirectional GRU (6 hidden units) over the signal, all time steps read out linearly."""

    feature_taps = ("flatten",)

    def __init__(self, num_classes: int = 10, hidden: int = 6, signal_length: int = SIGNAL_LENGTH) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size=1, hidden_size=hidden, batch_first=True, bidirectional=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * hidden * signal_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.gru(x.reshape(x.shape[0], -1, 1))
        return self.fc(self.flatten(sequence))


@register_model("mnist1d_linear", "mnist1d_linear", "MNIST-1D logistic regression (paper: 32%)", "signal")
def mnist1d_linear(num_classes: int = 10) -> nn.Module:
    return MNIST1DLinear(num_classes)


@register_model("mnist1d_mlp", "mnist1d_mlp", "MNIST-1D MLP, 2x100 hidden, residual (paper: 68%)", "signal")
def mnist1d_mlp(num_classes: int = 10, hidden: int = 100) -> nn.Module:
    return MNIST1DMLP(num_classes, hidden)


@register_model("mnist1d_cnn", "mnist1d_cnn", "MNIST-1D CNN, 3 conv1d x 25 channels (paper: 94%)", "signal")
def mnist1d_cnn(num_classes: int = 10, channels: int = 25, blocks: int = 1) -> nn.Module:
    return MNIST1DCNN(num_classes, channels, blocks=blocks)


@register_model("mnist1d_gru", "mnist1d_gru", "MNIST-1D bidirectional GRU, 6 units (paper: 91%)", "signal")
def mnist1d_gru(num_classes: int = 10, hidden: int = 6) -> nn.Module:
    return MNIST1DGRU(num_classes, hidden)
