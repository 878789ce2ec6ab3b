"""The vanilla baseline: cross-entropy on the labels and nothing from a teacher."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.methods.base import Method
from kdlab.methods.registry import register_method


@register_method
class CrossEntropyOnly(Method):
    """Supervised training only (teachers, and the 'vanilla student' row of every table)."""

    name = "ce"
    needs_teacher = False
    default_weights = {"ce": 1.0}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return {}
