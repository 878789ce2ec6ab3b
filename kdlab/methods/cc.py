"""CC: correlation congruence between samples, on linear embeddings of both models' features."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.features import ModelOutput
from kdlab.losses.relation import cc_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class CorrelationCongruence(Method):
    """CC: RepDistiller's correlation loss between linear embeddings of student and teacher."""

    name = "cc"
    paper = Paper(
        title="Correlation Congruence for Knowledge Distillation",
        authors="Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang",
        year=2019,
        venue="ICCV",
        arxiv="1904.01802",
    )
    # RepDistiller (run_cifar_distill.sh): -r 1 -a 0 -b 0.02.
    default_weights = {"ce": 1.0, "cc": 0.02}
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(self, feat_dim: int = 128) -> None:
        super().__init__()
        if feat_dim <= 0:
            raise ValueError(f"feat_dim must be positive, got {feat_dim}")
        self.feat_dim = feat_dim
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """One linear head per model (RepDistiller's LinearEmbed); both train with the student, the
        teacher's head too (RepDistiller puts embed_t in the optimiser), on the teacher's frozen features."""
        assert teacher is not None
        student_dim = student.features["embedding"].flatten(1).shape[1]
        teacher_dim = teacher.features["embedding"].flatten(1).shape[1]
        self.embed_student = nn.Linear(student_dim, self.feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, self.feat_dim)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None and self.embed_student is not None and self.embed_teacher is not None
        student_embedding = self.embed_student(student.features["embedding"].flatten(1))
        teacher_embedding = self.embed_teacher(teacher.features["embedding"].flatten(1))
        return {"cc": cc_loss(student_embedding, teacher_embedding)}
