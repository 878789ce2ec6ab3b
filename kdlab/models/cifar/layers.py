"""Building blocks shared by the CIFAR zoo: conv-BN units, shortcuts, channel shuffle, pooling, init."""

from __future__ import annotations

import torch
from torch import nn


class ConvBN(nn.Sequential):
    """Conv (no bias: the BN that follows has one) + BN, with an inplace ReLU when ``act`` is set."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        if act:
            self.act = nn.ReLU(inplace=True)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the residual keeps its shape, else a strided 1x1 conv + BN to match it."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups so grouped convs see every group's output."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        grouped = x.view(batch, self.groups, channels // self.groups, height, width)
        return grouped.transpose(1, 2).reshape(batch, channels, height, width)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def global_pool() -> nn.Sequential:
    """Average pool to 1x1 and flatten: its output is the [B, C] penultimate embedding (tap "pool")."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def kaiming_init(model: nn.Module, fc_std: float | None = None) -> None:
    """The reference models' init: He-normal (fan-out) convs with zero bias; optionally N(0, std) linears.

    BatchNorm already starts at weight 1 and bias 0 in PyTorch, as the reference sets it.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and fc_std is not None:
            nn.init.normal_(module.weight, 0.0, fc_std)
            nn.init.zeros_(module.bias)
