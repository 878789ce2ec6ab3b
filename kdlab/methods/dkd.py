"""Decoupled KD: split KD into its target-class and non-target-class parts and reweight them."""

from __future__ import annotations

import torch

from kdlab.data.base import Batch
from kdlab.features import ModelOutput
from kdlab.losses.response import dkd_loss
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


@register_method
class DecoupledKD(Method):
    """DKD: alpha * TCKD + beta * NCKD at T=4, linearly warmed up over the first epochs."""

    name = "dkd"
    paper = Paper(
        title="Decoupled Knowledge Distillation",
        authors="Zhao, Cui, Song, Qiu, Liang",
        year=2022,
        venue="CVPR",
        arxiv="2203.08679",
    )
    uses_labels = True
    # mdistiller's CIFAR-100 setting: CE 1.0 plus the DKD term (its alpha/beta are parameters).
    default_weights = {"ce": 1.0, "dkd": 1.0}

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup: int = 20) -> None:
        super().__init__()
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 epochs, got {warmup}")
        self.alpha = alpha
        self.beta = beta
        self.set_temperature(temperature)
        self.warmup = warmup

    def warmup_factor(self) -> float:
        """mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epoch (``self.epoch`` is 0-based),
        so the first epoch already uses 1/warmup of the term and epoch ``warmup - 1`` all of it."""
        if self.warmup == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup, 1.0)

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        loss = dkd_loss(student.logits, teacher.logits, batch["target"], self.alpha, self.beta, self.temperature)
        return {"dkd": self.warmup_factor() * loss}
