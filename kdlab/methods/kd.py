"""Hinton knowledge distillation: match the teacher's temperature-softened outputs."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses import kd_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class KnowledgeDistillation(Method):
    """KD: CE on labels plus T^2-scaled KL to the teacher's softened distribution."""

    name = "kd"
    paper = Paper(
        title="Distilling the Knowledge in a Neural Network",
        authors="Hinton, Vinyals, Dean",
        year=2015,
        venue="NIPS Deep Learning Workshop",
        arxiv="1503.02531",
    )
    # CE 0.1 + KD 0.9 at T=4: the setting of the CRD benchmark (RepDistiller's train_student.py).
    default_weights = {"ce": 0.1, "kd": 0.9}

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.set_temperature(temperature)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"kd": kd_loss(student.logits, teacher.logits, self.temperature)}
