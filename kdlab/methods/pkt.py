"""PKT: the student matches the teacher's probability distribution over sample neighbourhoods."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.relation import pkt_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class ProbabilisticKT(Method):
    """PKT: KL between the cosine-kernel conditional probabilities of the embeddings."""

    name = "pkt"
    paper = Paper(
        title="Learning Deep Representations with Probabilistic Knowledge Transfer",
        authors="Passalis, Tefas",
        year=2018,
        venue="ECCV",
        arxiv="1803.10837",
    )
    # RepDistiller (run_cifar_distill.sh): -r 1 -a 0 -b 30000.
    default_weights = {"ce": 1.0, "pkt": 30000.0}
    student_taps = ("embedding",)
    teacher_taps = ("embedding",)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"pkt": pkt_loss(student.features["embedding"], teacher.features["embedding"])}
