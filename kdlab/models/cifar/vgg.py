"""CIFAR VGGs with BatchNorm and a single linear classifier (no FC stack), as used by CRD and DKD.

Five stages of 3x3 conv-BN-ReLU units with a 2x2 max-pool before stages 1-3, so at 32x32 the last
two stages run at 4x4. (RepDistiller's vgg.py, whose parameter layout and order this follows, adds
a fourth max-pool only for 64x64 inputs; that input-dependent branch is left out.) Every unit ends
in its own non-inplace ``out_act``, so ``layerK[-1].out_act`` sees the stage's pre-ReLU output.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import global_pool, kaiming_init
from kdlab.models.registry import register_model

WIDTHS = (64, 128, 256, 512, 512)


class ConvUnit(nn.Sequential):
    """3x3 conv (with bias, as in the reference) + BN + non-inplace ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.out_act = nn.ReLU()


class VGG(nn.Module):
    """``convs[i]`` units in stage i; stage 0 is the stem, stages 1-3 start with a 2x2 max-pool."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def __init__(self, convs: tuple[int, int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.stem = self._stage(3, WIDTHS[0], convs[0], pooled=False)
        self.layer1 = self._stage(WIDTHS[0], WIDTHS[1], convs[1], pooled=True)
        self.layer2 = self._stage(WIDTHS[1], WIDTHS[2], convs[2], pooled=True)
        self.layer3 = self._stage(WIDTHS[2], WIDTHS[3], convs[3], pooled=True)
        self.layer4 = self._stage(WIDTHS[3], WIDTHS[4], convs[4], pooled=False)
        self.pool = global_pool()
        self.fc = nn.Linear(WIDTHS[4], num_classes)
        kaiming_init(self, fc_std=0.01)

    @staticmethod
    def _stage(in_channels: int, channels: int, convs: int, pooled: bool) -> nn.Sequential:
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if pooled else []
        layers += [ConvUnit(in_channels if i == 0 else channels, channels) for i in range(convs)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


@register_model("vgg8", "cifar_vgg8", "CIFAR VGG-8-BN (3.97M), a CRD/DKD student", "image")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 (one conv per stage): the student of vgg13 and resnet50 in CRD/DKD."""
    return VGG((1, 1, 1, 1, 1), num_classes)


@register_model("vgg11", "cifar_vgg11", "CIFAR VGG-11-BN (9.28M), RepDistiller zoo", "image")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 (configuration A)."""
    return VGG((1, 1, 2, 2, 2), num_classes)


@register_model("vgg13", "cifar_vgg13", "CIFAR VGG-13-BN (9.46M), a CRD/DKD teacher", "image")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 (configuration B): teaches vgg8 and mobilenetv2 in CRD/DKD."""
    return VGG((2, 2, 2, 2, 2), num_classes)


@register_model("vgg16", "cifar_vgg16", "CIFAR VGG-16-BN (14.77M), RepDistiller zoo", "image")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 (configuration D)."""
    return VGG((2, 2, 3, 3, 3), num_classes)


@register_model("vgg19", "cifar_vgg19", "CIFAR VGG-19-BN (20.09M), RepDistiller zoo", "image")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 (configuration E)."""
    return VGG((2, 2, 4, 4, 4), num_classes)
