"""Building blocks of the feature-based methods, for 1-D (``[B, C, L]``) and 2-D (``[B, C, H, W]``) maps.

RepDistiller writes its regressors, connectors and paraphrasers with 2-D layers; these pick the
layer of the feature's dimensionality so the same method runs on MNIST-1D signals and on images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.errors import ConfigError


@dataclass(frozen=True)
class SpatialLayers:
    """The conv, transposed conv and batch-norm classes of one spatial dimensionality."""

    conv: type[nn.Module]
    conv_transpose: type[nn.Module]
    batch_norm: type[nn.Module]


_LAYERS = {
    1: SpatialLayers(nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d),
    2: SpatialLayers(nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
    3: SpatialLayers(nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d),
}


def spatial_layers(shape: Sequence[int], what: str) -> SpatialLayers:
    """The layers for a ``[B, C, *spatial]`` feature; a feature without positions is a clear error."""
    layers = _LAYERS.get(len(shape) - 2)
    if layers is None:
        raise ConfigError(
            f"{what} must be a feature map [B, C, L] or [B, C, H, W], got shape {list(shape)}"
            " (tap a convolutional stage, not a flat vector)"
        )
    return layers


class ConvReg(nn.Module):
    """FitNet's convolutional regressor (RepDistiller ``ConvReg``): student map -> teacher map shape.

    The layer follows the spatial ratio: a 3-wide stride-2 conv when the student map is twice the
    teacher's, a 4-wide stride-2 transposed conv when it is half, else a conv whose kernel
    ``1 + s - t`` shrinks it to the teacher's size (1x1 for equal sizes); then BN and (optionally)
    ReLU. A student map smaller than the teacher's by other than half, which the reference rejects,
    gets a transposed conv of kernel ``1 + t - s``.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        layers = spatial_layers(student_shape, "the student feature")
        if len(teacher_shape) != len(student_shape):
            raise ConfigError(f"student feature {list(student_shape)} and teacher {list(teacher_shape)} differ in rank")
        s_channels, t_channels = student_shape[1], teacher_shape[1]
        sizes = list(zip(student_shape[2:], teacher_shape[2:], strict=True))
        if all(s == 2 * t for s, t in sizes):
            self.conv = layers.conv(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
        elif all(2 * s == t for s, t in sizes):
            self.conv = layers.conv_transpose(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
        elif all(s >= t for s, t in sizes):
            self.conv = layers.conv(s_channels, t_channels, kernel_size=tuple(1 + s - t for s, t in sizes))
        elif all(s <= t for s, t in sizes):
            self.conv = layers.conv_transpose(s_channels, t_channels, kernel_size=tuple(1 + t - s for s, t in sizes))
        else:
            raise ConfigError(
                f"cannot regress a student map of size {list(student_shape[2:])}"
                f" onto a teacher map of size {list(teacher_shape[2:])}"
            )
        self.bn = layers.batch_norm(t_channels)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))
