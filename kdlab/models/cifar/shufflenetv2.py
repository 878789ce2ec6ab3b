"""ShuffleNetV2 (1x: 116/232/464 channels, 1024-wide head) for 32x32 inputs, the CRD/DKD student.

Follows RepDistiller's ShuffleNetv2.py in layout, parameter order and forward (1x1 stem, no
max-pool); the other standard widths are available through ``width``.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.cifar.layers import ChannelShuffle, ConvBN, global_pool
from kdlab.models.registry import register_model

STEM_CHANNELS = 24
# width -> (stage channels, head channels)
WIDTHS: dict[float, tuple[tuple[int, int, int], int]] = {
    0.5: ((48, 96, 192), 1024),
    1.0: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2.0: ((224, 488, 976), 2048),
}
BLOCKS = (3, 7, 3)


class DownUnit(nn.Module):
    """Halve the resolution: two strided branches (depthwise-first and 1x1-first) concatenated, shuffled."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            ConvBN(in_channels, in_channels, 3, 2, groups=in_channels, act=False), ConvBN(in_channels, half)
        )
        self.right = nn.Sequential(
            ConvBN(in_channels, half), ConvBN(half, half, 3, 2, groups=half, act=False), ConvBN(half, half)
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(torch.cat([self.left(x), self.right(x)], 1))


class SplitUnit(nn.Module):
    """Keep half the channels, transform the other half (1x1, 3x3 depthwise, 1x1), concatenate, shuffle.

    ``out_act`` is applied to the whole concatenation rather than the transformed half only: the kept
    half is already non-negative (every unit before ends in a ReLU), so the output is the reference's,
    and a hook on ``out_act`` sees the reference's full pre-activation ``[kept, branch]``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            ConvBN(half, half), ConvBN(half, half, 3, groups=half, act=False), ConvBN(half, half, act=False)
        )
        self.out_act = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, active = x.chunk(2, dim=1)
        return self.shuffle(self.out_act(torch.cat([kept, self.branch(active)], 1)))


class ShuffleNetV2(nn.Module):
    """1x1 stem, three stages (a down unit then split units), a 1x1 conv head, linear classifier."""

    feature_taps = ("stem", "layer1", "layer2", "layer3", "pool")

    def __init__(self, num_classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        if width not in WIDTHS:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(WIDTHS)}, got {width}")
        widths, head_channels = WIDTHS[width]
        self.stem = ConvBN(3, STEM_CHANNELS)
        in_channels = STEM_CHANNELS
        stages = []
        for channels, count in zip(widths, BLOCKS, strict=True):
            stages.append(nn.Sequential(DownUnit(in_channels, channels), *(SplitUnit(channels) for _ in range(count))))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv_head = ConvBN(in_channels, head_channels)
        self.pool = global_pool()
        self.fc = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(self.conv_head(x)))


@register_model("shufflenetv2", "cifar_shufflenetv2", "CIFAR ShuffleNetV2 1x (1.36M), a CRD/DKD student", "image")
def shufflenetv2(num_classes: int = 100, width: float = 1.0) -> ShuffleNetV2:
    """ShuffleNetV2 (1x by default): the student of resnet32x4 in CRD/DKD."""
    return ShuffleNetV2(num_classes, width)
