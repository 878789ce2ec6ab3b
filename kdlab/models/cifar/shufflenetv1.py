"""ShuffleNet (v1, 3 groups, 240/480/960 channels) for 32x32 inputs, the CRD/DKD student.

Follows RepDistiller's ShuffleNetv1.py in layout, parameter order and forward: a 1x1 stem, a ReLU
after the depthwise conv too (the paper has none there), and an ungrouped first 1x1 conv in the
very first unit because its 24 input channels are too few to group.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ChannelShuffle, ConvBN, global_pool
from kdlab.models.registry import register_model

STEM_CHANNELS = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1 reduce, shuffle, 3x3 depthwise, grouped 1x1 expand, then add (stride 1) or concat.

    A strided unit concatenates an average-pooled copy of its input, so its branch produces only
    ``out_channels - in_channels`` channels. ``out_act`` sees the pre-ReLU sum or concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, group_first: bool) -> None:
        super().__init__()
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        mid = branch_channels // 4
        first_groups = groups if group_first else 1
        self.reduce = ConvBN(in_channels, mid, groups=first_groups)
        self.shuffle = ChannelShuffle(first_groups)
        self.depthwise = ConvBN(mid, mid, 3, stride, groups=mid)
        self.expand = ConvBN(mid, branch_channels, groups=groups, act=False)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.concat = stride == 2
        self.out_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.depthwise(self.shuffle(self.reduce(x))))
        skip = self.shortcut(x)
        return self.out_act(torch.cat([out, skip], 1) if self.concat else out + skip)


class ShuffleNetV1(nn.Module):
    """1x1 stem and three stages whose first unit halves the resolution and widens by concatenation."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "pool")

    def __init__(
        self,
        num_classes: int = 100,
        widths: tuple[int, int, int] = (240, 480, 960),
        blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        stages = []
        for index, (channels, count) in enumerate(zip(widths, blocks, strict=True)):
            units = [ShuffleUnit(in_channels, channels, 2, groups, group_first=index > 0)]
            units += [ShuffleUnit(channels, channels, 1, groups, group_first=True) for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = global_pool()
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x))


@register_model("shufflenetv1", "cifar_shufflenetv1", "CIFAR ShuffleNetV1 g=3 (0.95M), a CRD/DKD student", "image")
def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNetV1 (3 groups): the student of resnet32x4 and wrn_40_2 in CRD/DKD."""
    return ShuffleNetV1(num_classes)
