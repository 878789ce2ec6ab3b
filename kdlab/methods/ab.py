"""Activation-boundary transfer: an initialisation stage teaches the student where the teacher's
neurons switch on; the main stage is then plain supervised training."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput, feature_parameters
from kdlab.losses.feature import ab_loss
from kdlab.methods.adapters import ConvReg
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class ActivationBoundaries(Method):
    """AB: hinge loss on the sign of pre-activations (init stage), then CE alone."""

    name = "ab"
    paper = Paper(
        title="Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
        authors="Heo, Lee, Yun, Choi",
        year=2019,
        venue="AAAI",
        arxiv="1811.03233",
    )
    # RepDistiller / CRD (-r 1 -a 0 -b 1) sets the main stage's distillation loss to 0 after the
    # init stage, so the only main-stage term is CE; the AB loss is the init stage's (weight 1).
    default_weights = {"ce": 1.0}
    student_taps = ("preacts",)
    teacher_taps = ("preacts",)

    def __init__(self, margin: float = 1.0, init_epochs: int = 30, init_lr: float | None = None) -> None:
        """``margin``: how far past the boundary a student response must be (1.0 in the paper).
        ``init_epochs``/``init_lr``: the init stage (RepDistiller: 30 epochs at the student's lr), the
        only place AB transfers anything: with 0 epochs this is the CE baseline."""
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        self.margin = margin
        self.set_init_stage(init_epochs, init_lr)
        self.connectors = nn.ModuleList()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """One connector per layer: identity where the shapes agree, else conv + BN (RepDistiller's
        ``Connector``: ``ConvReg`` without ReLU, a 1x1 conv for equal spatial sizes)."""
        assert teacher is not None
        s_feats, t_feats = student.features["preacts"], teacher.features["preacts"]
        if len(s_feats) != len(t_feats):
            raise ConfigError(
                f"ab: the student has {len(s_feats)} pre-activation layers and the teacher {len(t_feats)};"
                " AB pairs them one to one"
            )
        self.connectors = nn.ModuleList(
            nn.Identity() if s.shape[1:] == t.shape[1:] else ConvReg(s.shape, t.shape, use_relu=False)
            for s, t in zip(s_feats, t_feats, strict=True)
        )

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """None: the connectors serve only the init stage (RepDistiller leaves them out of the main
        optimiser)."""
        return iter(())

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """Every student layer but the classifier, and the connectors."""
        return [*feature_parameters(student), *self.connectors.parameters()]

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        connected = [c(f) for c, f in zip(self.connectors, student.features["preacts"], strict=True)]
        return {"ab": ab_loss(connected, teacher.features["preacts"], self.margin)}
