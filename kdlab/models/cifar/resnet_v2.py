"""ResNet-50 for 32x32 inputs: the ImageNet bottleneck layout with a 3x3 stride-1 stem and no max-pool.

CRD and DKD use it as a cross-architecture teacher (e.g. for mobilenetv2 and vgg8). It is not a
pre-activation ("v2") ResNet; the module name follows RepDistiller's resnetv2.py, whose parameter
layout and order it reproduces.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ConvBN, global_pool, kaiming_init, projection_shortcut
from kdlab.models.registry import register_model

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus a shortcut; ``out_act`` sees the pre-ReLU sum."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = channels * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)
        self.out_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.out_act(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """64-channel 3x3 stem and four bottleneck stages (64..512 wide, x4 out), stages 2-4 strided."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.stem = ConvBN(3, 64, kernel_size=3)
        self.layer1 = self._stage(64, 64, blocks[0], stride=1)
        self.layer2 = self._stage(64 * EXPANSION, 128, blocks[1], stride=2)
        self.layer3 = self._stage(128 * EXPANSION, 256, blocks[2], stride=2)
        self.layer4 = self._stage(256 * EXPANSION, 512, blocks[3], stride=2)
        self.pool = global_pool()
        self.fc = nn.Linear(512 * EXPANSION, num_classes)
        kaiming_init(self)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_channels, channels, stride)]
        layers += [Bottleneck(channels * EXPANSION, channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


@register_model("resnet50", "cifar_resnet50", "CIFAR ResNet-50 (23.71M), a CRD/DKD cross-architecture teacher", "image")
def resnet50(num_classes: int = 100) -> BottleneckResNet:
    """ResNet-50 (3, 4, 6, 3 bottlenecks) for 32x32 inputs: teaches mobilenetv2 and vgg8 in CRD/DKD."""
    return BottleneckResNet((3, 4, 6, 3), num_classes)
