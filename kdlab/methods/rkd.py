"""RKD: the student keeps the teacher's distances and angles between the samples of a batch."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.relation import rkd_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class RelationalKD(Method):
    """RKD: distance-wise and angle-wise relations of the embeddings (smooth L1)."""

    name = "rkd"
    paper = Paper(
        title="Relational Knowledge Distillation",
        authors="Park, Kim, Lu, Cho",
        year=2019,
        venue="CVPR",
        arxiv="1904.05068",
    )
    # RepDistiller: -r 1 -a 0 -b 1, with the paper's inner weights 25 (distance) and 50 (angle).
    default_weights = {"ce": 1.0, "rkd": 1.0}
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"distance_weight and angle_weight must be >= 0, got {distance_weight}, {angle_weight}")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        loss = rkd_loss(
            student.features["embedding"], teacher.features["embedding"], self.distance_weight, self.angle_weight
        )
        return {"rkd": loss}
