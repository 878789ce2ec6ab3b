"""DIST: distil the teacher's inter- and intra-class prediction relations (Pearson correlation)."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.response import dist_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class DIST(Method):
    """DIST: 1 - Pearson correlation of softened predictions, per sample and per class."""

    name = "dist"
    paper = Paper(
        title="Knowledge Distillation from A Stronger Teacher",
        authors="Huang, You, Wang, Qian, Xu",
        year=2022,
        venue="NeurIPS",
        arxiv="2205.10536",
    )
    # The authors' CIFAR-100 setting (configs/strategies/distill/dist_cifar.yaml): CE 1, DIST 2,
    # kd "dist_t4" = beta 1, gamma 1, tau 4 (the paper's beta = gamma = 2).
    default_weights = {"ce": 1.0, "dist": 2.0}

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.set_temperature(temperature)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        return {"dist": dist_loss(student.logits, teacher.logits, self.beta, self.gamma, self.temperature)}
