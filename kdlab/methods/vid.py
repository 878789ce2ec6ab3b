"""Variational information distillation: maximise a variational lower bound on the mutual
information between teacher and student stages (a Gaussian predicted from the student)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.features import ModelOutput
from kdlab.losses.feature import pool_to_match, vid_loss
from kdlab.methods.adapters import spatial_layers
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


class VIDHead(nn.Module):
    """Predicts the teacher feature's Gaussian from the student's: the mean by three 1x1 convs
    (no bias; ``C_s -> hidden -> hidden -> C_t`` with ReLUs), one variance per teacher channel as
    ``softplus(log_scale) + eps``, starting at ``init_pred_var`` (RepDistiller's ``VIDLoss``)."""

    def __init__(
        self,
        student_shape: Sequence[int],
        teacher_shape: Sequence[int],
        hidden: int,
        init_pred_var: float,
        eps: float,
    ) -> None:
        super().__init__()
        conv = spatial_layers(student_shape, "vid: the student feature").conv
        s_channels, t_channels = student_shape[1], teacher_shape[1]
        self.regressor = nn.Sequential(
            conv(s_channels, hidden, 1, bias=False),
            nn.ReLU(),
            conv(hidden, hidden, 1, bias=False),
            nn.ReLU(),
            conv(hidden, t_channels, 1, bias=False),
        )
        # The inverse softplus of (init_pred_var - eps), so that the initial variance is init_pred_var.
        self.log_scale = nn.Parameter(torch.full((t_channels,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return F.softplus(self.log_scale) + self.eps

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """The negative log-likelihood of the teacher feature (pooled to the smaller spatial size)."""
        student_feature, teacher_feature = pool_to_match(student_feature, teacher_feature)
        return vid_loss(self.regressor(student_feature), teacher_feature, self.variance())


@register_method
class VariationalInformationDistillation(Method):
    """VID: Gaussian negative log-likelihood of each teacher stage given the student's, summed."""

    name = "vid"
    paper = Paper(
        title="Variational Information Distillation for Knowledge Transfer",
        authors="Ahn, Hu, Damianou, Lawrence, Dai",
        year=2019,
        venue="CVPR",
        arxiv="1904.05835",
    )
    # RepDistiller / CRD: -r 1 -a 0 -b 1.
    default_weights = {"ce": 1.0, "vid": 1.0}
    student_taps = ("stages",)
    teacher_taps = ("stages",)

    def __init__(self, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        """``init_pred_var``: the variances' starting value; ``eps``: their floor (reference values)."""
        super().__init__()
        if init_pred_var <= eps or eps <= 0:
            raise ValueError(f"need 0 < eps < init_pred_var, got eps={eps}, init_pred_var={init_pred_var}")
        self.init_pred_var = init_pred_var
        self.eps = eps
        self.heads = nn.ModuleList()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """One head per stage pair (zip: the shorter list wins), hidden width = teacher channels."""
        assert teacher is not None
        self.heads = nn.ModuleList(
            VIDHead(s.shape, t.shape, t.shape[1], self.init_pred_var, self.eps)
            for s, t in zip(student.features["stages"], teacher.features["stages"], strict=False)
        )

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        assert teacher is not None
        pairs = zip(self.heads, student.features["stages"], teacher.features["stages"], strict=False)
        return {"vid": sum((head(s, t) for head, s, t in pairs), start=student.logits.new_zeros(()))}
