"""Factor transfer: a paraphraser (autoencoder on the teacher's last stage) extracts factors; a
translator on the student learns to produce the same factors."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput
from kdlab.losses.feature import factor_transfer_loss
from kdlab.methods.adapters import spatial_layers
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method

LEAKY_SLOPE = 0.1


def _conv_stack(conv: type[nn.Module], norm: type[nn.Module] | None, channels: Sequence[int]) -> nn.Sequential:
    """3-wide, size-preserving convs ``channels[i] -> channels[i+1]``, each + (BN) + LeakyReLU(0.1)."""
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if norm is not None:
            layers.append(norm(c_out))
        layers.append(nn.LeakyReLU(LEAKY_SLOPE))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side autoencoder (RepDistiller's default: no BN): encoder ``C -> C -> kC -> kC``
    convs, decoder ``kC -> kC -> C -> C`` transposed convs, LeakyReLU(0.1) after each."""

    def __init__(self, teacher_shape: Sequence[int], rate: float) -> None:
        super().__init__()
        layers = spatial_layers(teacher_shape, "ft: the teacher feature")
        channels, factors = teacher_shape[1], int(teacher_shape[1] * rate)
        if factors < 1:
            raise ConfigError(f"ft: rate {rate} leaves no factor channel for a {channels}-channel teacher feature")
        self.encoder = _conv_stack(layers.conv, None, (channels, channels, factors, factors))
        self.decoder = _conv_stack(layers.conv_transpose, None, (factors, factors, channels, channels))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``feature`` (the factors are ``self.encoder(feature)``)."""
        return self.decoder(self.encoder(feature))


class Translator(nn.Sequential):
    """The student-side encoder: ``C_s -> C_s -> kC_t -> kC_t`` convs, each + BN + LeakyReLU(0.1)."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], rate: float) -> None:
        layers = spatial_layers(student_shape, "ft: the student feature")
        channels, factors = student_shape[1], int(teacher_shape[1] * rate)
        super().__init__(*_conv_stack(layers.conv, layers.batch_norm, (channels, channels, factors, factors)))


@register_method
class FactorTransfer(Method):
    """FT: L1 between the student's translated and the teacher's paraphrased factors (after an
    init stage that trains the paraphraser)."""

    name = "ft"
    paper = Paper(
        title="Paraphrasing Complex Network: Network Compression via Factor Transfer",
        authors="Kim, Park, Kwak",
        year=2018,
        venue="NeurIPS",
        arxiv="1802.04977",
    )
    # RepDistiller / CRD: -r 1 -a 0 -b 200.
    default_weights = {"ce": 1.0, "ft": 200.0}
    student_taps = ("stage:-1",)
    teacher_taps = ("stage:-1",)

    def __init__(self, rate: float = 0.5, p: float = 1.0, init_epochs: int = 30, init_lr: float | None = None) -> None:
        """``rate``: factor channels per teacher channel (k = 0.5); ``p``: the factor distance's norm.
        ``init_epochs``/``init_lr``: the paraphraser's training. RepDistiller trains it at lr 0.01
        when the student is a CIFAR ResNet or WRN and at the student's lr otherwise; None means the
        student's lr, so set 0.01 in those experiments."""
        super().__init__()
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.rate = rate
        self.p = p
        self.set_init_stage(init_epochs, init_lr)
        self.paraphraser: Paraphraser | None = None
        self.translator: Translator | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        assert teacher is not None
        s_shape, t_shape = student.features["stage:-1"].shape, teacher.features["stage:-1"].shape
        self.paraphraser = Paraphraser(t_shape, self.rate)
        self.translator = Translator(s_shape, t_shape, self.rate)
        self.train(self.training)  # the paraphraser's mode follows the stage

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None and self.paraphraser is not None and self.translator is not None
        with torch.no_grad():  # the paraphraser is frozen after its init stage
            teacher_factor = self.paraphraser.encoder(teacher.features["stage:-1"])
        student_factor = self.translator(student.features["stage:-1"])
        return {"ft": factor_transfer_loss(student_factor, teacher_factor, self.p)}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Only the translator trains with the student; the paraphraser stays as the init stage left it."""
        assert self.translator is not None
        return self.translator.parameters()

    def train(self, mode: bool = True) -> FactorTransfer:
        """Keep the frozen paraphraser in eval mode outside its init stage (RepDistiller does)."""
        super().train(mode)
        if self.paraphraser is not None:
            self.paraphraser.train(mode and self.stage == "init")
        return self

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """The paraphraser alone; the student is untouched until the main stage."""
        assert self.paraphraser is not None
        return list(self.paraphraser.parameters())

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """MSE between the teacher feature and its reconstruction."""
        assert teacher is not None and self.paraphraser is not None
        feature = teacher.features["stage:-1"]
        return {"reconstruction": F.mse_loss(self.paraphraser(feature), feature)}
