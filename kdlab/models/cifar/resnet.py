"""CIFAR ResNets of He et al. (6n+2 layers, three stages), as used by CRD and DKD.

resnet20..resnet110 use stage widths 16/32/64; the "x4" variants (resnet8x4, resnet32x4) use
64/128/256 after a 32-channel stem. Parameter layout and order follow RepDistiller's resnet.py.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ConvBN, global_pool, kaiming_init, projection_shortcut
from kdlab.models.registry import register_model

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; ``out_act`` is separate so hooks see the pre-ReLU sum."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = projection_shortcut(in_channels, channels, stride)
        self.out_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.out_act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem and three stages of ``(depth - 2) / 6`` basic blocks (the first of stages 2-3 strided)."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "pool")

    def __init__(self, depth: int, widths: tuple[int, int, int, int] = NARROW, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.stem = ConvBN(3, widths[0], kernel_size=3)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.pool = global_pool()
        self.fc = nn.Linear(widths[3], num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, channels, stride)]
        layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


@register_model("resnet8", "cifar_resnet8", "CIFAR ResNet-8 (0.08M), RepDistiller zoo", "image")
def resnet8(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8: one basic block per stage."""
    return CifarResNet(8, NARROW, num_classes)


@register_model("resnet14", "cifar_resnet14", "CIFAR ResNet-14 (0.18M), RepDistiller zoo", "image")
def resnet14(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-14: two basic blocks per stage."""
    return CifarResNet(14, NARROW, num_classes)


@register_model("resnet20", "cifar_resnet20", "CIFAR ResNet-20 (0.28M), a CRD/DKD student", "image")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-20: the student of resnet56 and resnet110 in CRD/DKD."""
    return CifarResNet(20, NARROW, num_classes)


@register_model("resnet32", "cifar_resnet32", "CIFAR ResNet-32 (0.47M), a CRD/DKD student", "image")
def resnet32(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32: the student of resnet110 in CRD/DKD."""
    return CifarResNet(32, NARROW, num_classes)


@register_model("resnet44", "cifar_resnet44", "CIFAR ResNet-44 (0.67M), RepDistiller zoo", "image")
def resnet44(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-44: seven basic blocks per stage."""
    return CifarResNet(44, NARROW, num_classes)


@register_model("resnet56", "cifar_resnet56", "CIFAR ResNet-56 (0.86M), a CRD/DKD teacher", "image")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-56: the teacher of resnet20 in CRD/DKD."""
    return CifarResNet(56, NARROW, num_classes)


@register_model("resnet110", "cifar_resnet110", "CIFAR ResNet-110 (1.74M), a CRD/DKD teacher", "image")
def resnet110(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-110: the teacher of resnet20 and resnet32 in CRD/DKD."""
    return CifarResNet(110, NARROW, num_classes)


@register_model("resnet8x4", "cifar_resnet8x4", "CIFAR ResNet-8x4 (1.23M), the CRD/DKD student", "image")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-8 with 4x wider stages: the student of resnet32x4 in CRD/DKD."""
    return CifarResNet(8, WIDE, num_classes)


@register_model("resnet32x4", "cifar_resnet32x4", "CIFAR ResNet-32x4 (7.43M), the CRD/DKD teacher", "image")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """CIFAR ResNet-32 with 4x wider stages: teaches resnet8x4 and both ShuffleNets in CRD/DKD."""
    return CifarResNet(32, WIDE, num_classes)
