"""SP: similar inputs should activate the student as similarly as they activate the teacher."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.relation import sp_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method

TAP = "stage:-1"  # RepDistiller's feat[-2]: the last stage's output


@register_method
class SimilarityPreserving(Method):
    """SP: match the row-normalised batch similarity matrices of the last stage."""

    name = "sp"
    paper = Paper(
        title="Similarity-Preserving Knowledge Distillation",
        authors="Tung, Mori",
        year=2019,
        venue="ICCV",
        arxiv="1907.09682",
    )
    # RepDistiller (run_cifar_distill.sh): -r 1 -a 0 -b 3000.
    default_weights = {"ce": 1.0, "sp": 3000.0}
    student_taps = (TAP,)
    teacher_taps = (TAP,)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"sp": sp_loss(student.features[TAP], teacher.features[TAP])}
