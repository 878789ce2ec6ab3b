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


class MNIST1DCNN(nn.Module):
    """Three strided 1-D convolutions (25 channels) and a linear read-out, as in the paper."""

    feature_taps = ("layer1", "layer2", "layer3", "flatten")
    preact_taps = ("layer1.1:input", "layer2.1:input", "layer3.1:input")

    def __init__(self, num_classes: int = 10, channels: int = 25, signal_length: int = SIGNAL_LENGTH) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
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
def mnist1d_cnn(num_classes: int = 10, channels: int = 25) -> nn.Module:
    return MNIST1DCNN(num_classes, channels)


@register_model("mnist1d_gru", "mnist1d_gru", "MNIST-1D bidirectional GRU, 6 units (paper: 91%)", "signal")
def mnist1d_gru(num_classes: int = 10, hidden: int = 6) -> nn.Module:
    return MNIST1DGRU(num_classes, hidden)
