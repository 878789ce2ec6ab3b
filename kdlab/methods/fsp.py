"""FSP: the student learns the teacher's "flow" between consecutive layers, as an initialisation."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import Feature, ModelOutput, feature_parameters
from kdlab.losses.relation import FeaturePair, fsp_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method

TAP = "stem+stages"


def consecutive_pairs(features: Feature) -> list[FeaturePair]:
    """(layer k, layer k+1) for every consecutive pair of the stem and the stages."""
    return list(pairwise(_as_list(features)))


@register_method
class FSP(Method):
    """FSP: an initialisation stage matching the Gram matrices of consecutive layers, then CE."""

    name = "fsp"
    paper = Paper(
        title="A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer Learning",
        authors="Yim, Joo, Bae, Kim",
        year=2017,
        venue="CVPR",
    )
    # RepDistiller trains on CE alone after the initialisation stage (loss_kd = 0, so its -b 50 is
    # unused). The "fsp" term is still returned, at weight 0, so it is logged during the main stage
    # and can be switched on (weights.fsp) as the "can also add loss to this stage" variant.
    default_weights = {"ce": 1.0, "fsp": 0.0}
    needs_equal_widths = True
    student_taps = (TAP,)
    teacher_taps = (TAP,)

    def __init__(self, init_epochs: int = 30, init_lr: float | None = None) -> None:
        super().__init__()
        self.set_init_stage(init_epochs, init_lr)

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Fail early unless every FSP matrix of the student has the teacher's shape (as RepDistiller's
        FSP requires equal channel counts at every stem/stage output)."""
        assert teacher is not None
        student_layers, teacher_layers = _as_list(student.features[TAP]), _as_list(teacher.features[TAP])
        if len(student_layers) != len(teacher_layers):
            raise ConfigError(
                f"method 'fsp': the student has {len(student_layers)} stem/stage outputs and the teacher"
                f" {len(teacher_layers)}; FSP pairs them layer by layer, so the counts must match"
            )
        if len(student_layers) < 2:
            raise ConfigError("method 'fsp' needs at least two stem/stage outputs to form an FSP matrix")
        for k, (s, t) in enumerate(zip(student_layers, teacher_layers, strict=True)):
            if s.shape[1] != t.shape[1]:
                raise ConfigError(
                    f"method 'fsp': layer {k} of '{TAP}' has {s.shape[1]} channels in the student and"
                    f" {t.shape[1]} in the teacher; FSP matrices are only comparable between layers of"
                    f" equal width (student widths {_widths(student_layers)}, teacher {_widths(teacher_layers)})"
                )
            if s.dim() != t.dim():
                raise ConfigError(
                    f"method 'fsp': layer {k} is {s.dim() - 2}-D in the student and {t.dim() - 2}-D in the teacher"
                )

    def _loss(self, student: ModelOutput, teacher: ModelOutput | None) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"fsp": fsp_loss(consecutive_pairs(student.features[TAP]), consecutive_pairs(teacher.features[TAP]))}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return self._loss(student, teacher)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """The student's feature layers (everything but the classifier: RepDistiller's get_feat_modules)."""
        return feature_parameters(student)

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return self._loss(student, teacher)


def _as_list(features: Feature) -> list[torch.Tensor]:
    return features if isinstance(features, list) else [features]


def _widths(layers: list[torch.Tensor]) -> list[int]:
    return [layer.shape[1] for layer in layers]
