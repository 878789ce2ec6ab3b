"""Attention transfer: the student matches the teacher's normalised spatial attention maps."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.feature import at_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class AttentionTransfer(Method):
    """AT: squared distance between normalised attention maps, summed over the stages."""

    name = "at"
    paper = Paper(
        title="Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks"
        " via Attention Transfer",
        authors="Zagoruyko, Komodakis",
        year=2017,
        venue="ICLR",
        arxiv="1612.03928",
    )
    # RepDistiller / CRD: -r 1 -a 0 -b 1000.
    default_weights = {"ce": 1.0, "at": 1000.0}
    student_taps = ("stages",)
    teacher_taps = ("stages",)

    def __init__(self, p: float = 2.0) -> None:
        """``p``: the power of the activations in the attention map (2 in the paper and the reference)."""
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = p

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        # Stage pairs shallow to deep; with unequal stage counts the extra deep stages are unused,
        # as in the reference's zip.
        pairs = zip(student.features["stages"], teacher.features["stages"], strict=False)
        return {"at": sum((at_loss(s, t, self.p) for s, t in pairs), start=student.logits.new_zeros(()))}
