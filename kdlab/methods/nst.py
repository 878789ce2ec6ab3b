"""Neuron selectivity transfer: match the distribution of channel activation patterns (MMD)."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.feature import nst_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class NeuronSelectivityTransfer(Method):
    """NST: polynomial-kernel MMD between student and teacher channel maps, summed over the stages."""

    name = "nst"
    paper = Paper(
        title="Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
        authors="Huang, Wang",
        year=2017,
        venue="arXiv preprint",
        arxiv="1707.01219",
    )
    # RepDistiller / CRD: -r 1 -a 0 -b 50.
    default_weights = {"ce": 1.0, "nst": 50.0}
    student_taps = ("stages",)
    teacher_taps = ("stages",)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        # Stage pairs shallow to deep; extra deep stages of the longer list are unused (zip).
        pairs = zip(student.features["stages"], teacher.features["stages"], strict=False)
        return {"nst": sum((nst_loss(s, t) for s, t in pairs), start=student.logits.new_zeros(()))}
