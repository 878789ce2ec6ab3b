"""Contrastive Representation Distillation (CRD), alone and with Hinton KD (the paper's CRD+KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput
from kdlab.losses import kd_loss
from kdlab.losses.contrastive import ContrastMemory, OtherClassSampler, crd_nce_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method

CRD_PAPER = Paper(
    title="Contrastive Representation Distillation",
    authors="Tian, Krishnan, Isola",
    year=2020,
    venue="ICLR",
    arxiv="1910.10699",
)


class Embed(nn.Module):
    """A linear projection to the contrastive space followed by L2 normalisation (CRD's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@register_method
class ContrastiveRepresentationDistillation(Method):
    """CRD: NCE between student and teacher embeddings, 16384 other-class negatives from memory banks."""

    name = "crd"
    paper = CRD_PAPER
    uses_labels = True
    # RepDistiller's scripts/run_cifar_distill.sh for CRD: -r 1 (CE), -a 0 (no KD), -b 0.8.
    default_weights = {"ce": 1.0, "crd": 0.8}
    # The penultimate vectors of both models (RepDistiller's feat[-1]).
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def __init__(
        self, feat_dim: int = 128, nce_k: int = 16384, nce_temperature: float = 0.07, nce_momentum: float = 0.5
    ) -> None:
        super().__init__()
        if feat_dim < 1 or nce_k < 1:
            raise ValueError(f"feat_dim and nce_k must be positive, got {feat_dim} and {nce_k}")
        if nce_temperature <= 0:
            raise ValueError(f"nce_temperature must be positive, got {nce_temperature}")
        if not 0.0 <= nce_momentum < 1.0:
            raise ValueError(f"nce_momentum must be in [0, 1), got {nce_momentum}")
        self.feat_dim = feat_dim
        self.nce_k = nce_k
        self.nce_temperature = nce_temperature
        self.nce_momentum = nce_momentum

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Both embedding heads (trained with the student), the memory banks over the training split
        and the other-class negative sampler."""
        assert teacher is not None
        student_dim = student.features["embedding"].flatten(1).shape[1]  # type: ignore[union-attr]
        teacher_dim = teacher.features["embedding"].flatten(1).shape[1]  # type: ignore[union-attr]
        self.embed_student = Embed(student_dim, self.feat_dim)
        self.embed_teacher = Embed(teacher_dim, self.feat_dim)
        self.memory = ContrastMemory(self.feat_dim, data.num_samples, self.nce_temperature, self.nce_momentum)
        try:
            self.negatives = OtherClassSampler(data.targets, data.num_classes)
        except ValueError as error:
            raise ConfigError(f"method '{self.name}': {error}") from None

    def crd_loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> torch.Tensor:
        """Both directions of the NCE objective: student anchors against the teacher bank and
        teacher anchors against the student bank, summed (RepDistiller's ``CRDLoss``)."""
        student_embedding = self.embed_student(student.features["embedding"])
        teacher_embedding = self.embed_teacher(teacher.features["embedding"])
        negatives = self.negatives(batch["target"], self.nce_k)
        scores_student, scores_teacher = self.memory(student_embedding, teacher_embedding, batch["index"], negatives)
        n_data = self.memory.n_data
        return crd_nce_loss(scores_student, n_data) + crd_nce_loss(scores_teacher, n_data)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"crd": self.crd_loss(student, teacher, batch)}


@register_method
class ContrastiveRepresentationDistillationKD(ContrastiveRepresentationDistillation):
    """CRD+KD: CRD plus Hinton KD at T=4 (the CRD paper's best row)."""

    name = "crd_kd"
    # RepDistiller's scripts/run_cifar_distill.sh for CRD+KD: -r 1 (CE), -a 1 (KD), -b 0.8.
    default_weights = {"ce": 1.0, "kd": 1.0, "crd": 0.8}

    def __init__(
        self,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_temperature: float = 0.07,
        nce_momentum: float = 0.5,
        temperature: float = 4.0,
    ) -> None:
        super().__init__(feat_dim, nce_k, nce_temperature, nce_momentum)
        self.set_temperature(temperature)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {
            "kd": kd_loss(student.logits, teacher.logits, self.temperature),
            "crd": self.crd_loss(student, teacher, batch),
        }
