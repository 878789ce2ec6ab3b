"""Offline distillation: a frozen teacher (or none, for the CE baseline) teaches one student."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.schemes.base import DistillationScheme
from kdlab.schemes.registry import register_scheme


@register_scheme("offline", "frozen teacher -> student (Hinton-style); with method=ce, plain supervised training")
class OfflineDistillation(DistillationScheme):
    """The system: student + method (+ frozen teacher). Loss = sum of weighted named terms.

    ``stage="init"`` runs the method's initialisation stage instead: its own loss terms (weight 1
    each) and only the parameters it names are optimised.
    """

    example = "mnist1d-zoo"
    reads_teacher_store = True

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        student = self.student_output(batch)
        teachers = self.teacher_outputs(batch)
        return self.method_terms(student, teachers[0] if teachers else None, batch)
