"""MobileNetV2 at half width, the CRD/DKD student (RepDistiller's ``mobile_half``: expand 6, width 0.5).

As in the reference (and unlike torchvision) the stem is strided, every inverted residual keeps its
1x1 expansion even at expand ratio 1, and the 1x1 head stays 1280 wide at widths <= 1. Blocks end
in a linear (un-activated) projection, so there is no pre-ReLU stage output; the stages group the
reference's seven block groups as its feature taps do.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ConvBN, global_pool, kaiming_init
from kdlab.models.registry import register_model

# (expand, channels, blocks, first stride) per block group, grouped into the four stages;
# expand None means the model's expand ratio, 1 keeps the first group unexpanded.
STAGES: tuple[tuple[tuple[int | None, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (None, 24, 2, 1)),
    ((None, 32, 3, 2),),
    ((None, 64, 4, 2), (None, 96, 3, 1)),
    ((None, 160, 3, 2), (None, 320, 1, 1)),
)
HEAD_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (strided), linear 1x1 project; residual when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBN(in_channels, hidden)
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """Strided 3x3 stem, four stages of inverted residuals, a 1x1 conv head, linear classifier."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "layer4", "pool")
    # Blocks end in a linear projection, so a stage output is already pre-activation (the
    # reference returns the same features with and without preact=True).
    preact_taps = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        in_channels = int(32 * width_mult)
        self.stem = ConvBN(3, in_channels, 3, stride=2)
        stages = []
        for groups in STAGES:
            blocks = []
            for expand, channels, count, first_stride in groups:
                out_channels = int(channels * width_mult)
                for i in range(count):
                    stride = first_stride if i == 0 else 1
                    blocks.append(InvertedResidual(in_channels, out_channels, stride, expand or expand_ratio))
                    in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        head_channels = int(HEAD_CHANNELS * width_mult) if width_mult > 1.0 else HEAD_CHANNELS
        self.conv_head = ConvBN(in_channels, head_channels)
        self.pool = global_pool()
        self.fc = nn.Linear(head_channels, num_classes)
        kaiming_init(self, fc_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(self.conv_head(x)))


@register_model("mobilenetv2", "cifar_mobilenetv2", "CIFAR MobileNetV2 x0.5 (0.81M), a CRD/DKD student", "image")
def mobilenetv2(num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5) -> MobileNetV2:
    """MobileNetV2 (half width by default): the student of vgg13 and resnet50 in CRD/DKD."""
    return MobileNetV2(num_classes, expand_ratio, width_mult)
