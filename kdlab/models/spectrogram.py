"""A small 2-D CNN student for MNIST-1D spectrograms (``paired_mnist1d``'s student view, ``[1, F, T]``).

Built like the zoo: named stages whose last ReLU is a separate ``out_act`` (pre-activation taps),
a parameter-free ``pool`` giving the ``[B, C]`` embedding, and an ``fc`` classifier, so every
feature tap spec (embedding, stages, stem+stages, preacts) works. With 16 channels it has about the
size of the paper's 1-D CNN (5,018 against 5,210 parameters for 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ConvBN, global_pool, kaiming_init
from kdlab.models.registry import register_model


class ConvStage(nn.Module):
    """3x3 conv-BN and a separate, non-inplace ReLU (hooks on ``out_act`` see the pre-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_channels, out_channels, 3, stride, act=False)
        self.out_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.conv(x))


class SpectrogramCNN(nn.Module):
    """Three conv stages (strides 1, 2, 2), global average pool, linear read-out; any ``[F, T]`` size."""

    feature_taps = ("layer1", "layer2", "layer3", "pool")

    def __init__(self, num_classes: int = 10, channels: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        self.layer1 = ConvStage(in_channels, channels, 1)
        self.layer2 = ConvStage(channels, channels, 2)
        self.layer3 = ConvStage(channels, channels, 2)
        self.pool = global_pool()
        self.fc = nn.Linear(channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(x)))))


@register_model(
    "mnist1d_spectrogram_cnn",
    "mnist1d_spectrogram_cnn",
    "MNIST-1D spectrogram student: 3 conv2d-BN-ReLU x 16 channels, global pool (paired_mnist1d)",
    "spectrogram",
)
def mnist1d_spectrogram_cnn(num_classes: int = 10, channels: int = 16) -> nn.Module:
    return SpectrogramCNN(num_classes, channels)
