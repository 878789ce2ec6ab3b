"""Wide ResNets WRN-d-k of Zagoruyko & Komodakis (pre-activation blocks), as used by CRD and DKD.

Blocks are pre-activation, so no block ends in a ReLU: a stage's output is a raw residual sum and
the model's only post-stage activation is the final ``bn`` + ``out_act`` before pooling. The
reference's pre-ReLU features of stages 1 and 2 are the outputs of ``layer2.0.bn1`` and
``layer3.0.bn1``; that of stage 3 is the input of ``out_act``. Layout and order follow RepDistiller's wrn.py.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import global_pool, kaiming_init
from kdlab.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice plus a shortcut; a shape-changing shortcut is a 1x1 conv on the activated input."""

    def __init__(self, in_channels: int, channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU()  # not inplace: a hook on bn1 must keep the pre-activation
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None if in_channels == channels else nn.Conv2d(in_channels, channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(activated)))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """3x3 conv stem, three stages of ``(depth - 4) / 6`` pre-activation blocks 16k/32k/64k wide."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "pool")
    preact_taps = ("layer2.0.bn1", "layer3.0.bn1", "out_act:input")  # see the module docstring

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], blocks, 1, drop_rate)
        self.layer2 = self._stage(widths[1], widths[2], blocks, 2, drop_rate)
        self.layer3 = self._stage(widths[2], widths[3], blocks, 2, drop_rate)
        self.bn = nn.BatchNorm2d(widths[3])
        self.out_act = nn.ReLU()
        self.pool = global_pool()
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
        layers = [PreActBlock(in_channels, channels, stride, drop_rate)]
        layers += [PreActBlock(channels, channels, 1, drop_rate) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.out_act(self.bn(x))))


@register_model("wrn_16_1", "cifar_wrn_16_1", "CIFAR WRN-16-1 (0.18M), RepDistiller zoo", "image")
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-1: two blocks per stage, widths 16/32/64."""
    return WideResNet(16, 1, num_classes, drop_rate)


@register_model("wrn_16_2", "cifar_wrn_16_2", "CIFAR WRN-16-2 (0.70M), a CRD/DKD student", "image")
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-2: the student of wrn_40_2 in CRD/DKD."""
    return WideResNet(16, 2, num_classes, drop_rate)


@register_model("wrn_40_1", "cifar_wrn_40_1", "CIFAR WRN-40-1 (0.57M), a CRD/DKD student", "image")
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-1: the student of wrn_40_2 in CRD/DKD."""
    return WideResNet(40, 1, num_classes, drop_rate)


@register_model("wrn_40_2", "cifar_wrn_40_2", "CIFAR WRN-40-2 (2.26M), a CRD/DKD teacher", "image")
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2: teaches wrn_16_2, wrn_40_1 and shufflenetv1 in CRD/DKD."""
    return WideResNet(40, 2, num_classes, drop_rate)
