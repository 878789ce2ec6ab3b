"""Contrastive losses: CRD's NCE objective over memory banks of past embeddings.

Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020). The student's and
the teacher's embeddings of the same sample form a positive pair; ``K`` embeddings of samples of
other classes, read from a memory bank, are the negatives. The conventions (noise distribution,
``eps``, the normaliser ``Z`` estimated once, momentum updates) are those of the authors'
RepDistiller code (``crd/criterion.py``, ``crd/memory.py``, ``dataset/cifar100.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def crd_nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of CRD (the paper's eq. 18) from the scores of one anchor direction.

    ``scores`` is ``[B, K + 1]``: ``P(i, j) = exp(a_i . m_j / tau) / Z`` of each anchor ``a_i``
    against its positive (column 0: the other model's memory entry of the same sample) and its
    ``K`` negatives (columns 1..K). With the noise distribution uniform over the ``N = n_data``
    training samples, ``Pn = 1 / N``, the probability that a pair came from the data is
    ``h = P / (P + K * Pn)``, and the loss is

        ``-(1 / B) * sum_i [ log h(pos_i) + sum_k log(1 - h(neg_ik)) ]``

    with ``1 - h = K * Pn / (P + K * Pn)``. As in RepDistiller's ``ContrastLoss``, ``eps = 1e-7``
    is added to each denominator (not to the numerator ``K * Pn``), negatives are summed and the
    total is averaged over the batch.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [batch, 1 + negatives] with at least one negative, got {list(scores.shape)}")
    if n_data < 1:
        raise ValueError(f"n_data must be positive, got {n_data}")
    noise = (scores.shape[1] - 1) / n_data  # K * Pn
    positive, negative = scores[:, 0], scores[:, 1:]
    log_h_positive = torch.log(positive / (positive + noise + eps))
    log_not_h_negative = torch.log(noise / (negative + noise + eps))
    return -(log_h_positive.sum() + log_not_h_negative.sum()) / scores.shape[0]


class ContrastMemory(nn.Module):
    """Two memory banks (student and teacher embeddings of every training sample) and the scores.

    Each bank is ``n_data x dim``, initialised uniformly in ``[-s, s]`` with ``s = 1 / sqrt(dim / 3)``
    (unit norm in expectation), and updated after scoring with the batch's embeddings:
    ``m <- normalise(momentum * m + (1 - momentum) * v)``. The normalisers ``Z`` of both directions
    are estimated once, from the first batch, as ``N * mean(exp(a . m / tau))``, and then fixed.
    Banks and ``Z`` are buffers, so a checkpoint holds them and a resumed run continues exactly.
    """

    memory_student: torch.Tensor
    memory_teacher: torch.Tensor
    normalizer: torch.Tensor

    def __init__(self, dim: int, n_data: int, temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        if dim < 1 or n_data < 1:
            raise ValueError(f"dim and n_data must be positive, got {dim} and {n_data}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.temperature = temperature
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_student", torch.rand(n_data, dim) * (2 * bound) - bound)
        self.register_buffer("memory_teacher", torch.rand(n_data, dim) * (2 * bound) - bound)
        # Z of the student-anchor and teacher-anchor scores; negative until the first batch sets it.
        self.register_buffer("normalizer", torch.full((2,), -1.0))

    @property
    def n_data(self) -> int:
        return self.memory_student.shape[0]

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B, K + 1]`` of the student anchors against the teacher bank and of the teacher
        anchors against the student bank (column 0: the sample ``index`` itself, then the rows
        ``negatives`` ``[B, K]``); then the batch's rows of both banks are updated.

        ``student`` and ``teacher`` are L2-normalised embeddings ``[B, dim]``. The scores are
        computed in the banks' precision (float32) whatever the autocast setting: ``exp(s / 0.07)``
        needs it.
        """
        rows = torch.cat([index[:, None], negatives], dim=1)
        with torch.autocast(device_type=student.device.type, enabled=False):
            student, teacher = student.to(self.memory_student.dtype), teacher.to(self.memory_teacher.dtype)
            # Against the whole bank, then the sampled rows: the gradient is the same as scoring the
            # gathered rows, without materialising [B, K + 1, dim] copies of them.
            scores_student = torch.exp((student @ self.memory_teacher.T).gather(1, rows) / self.temperature)
            scores_teacher = torch.exp((teacher @ self.memory_student.T).gather(1, rows) / self.temperature)
            if self.normalizer[0] < 0:
                self.normalizer[0] = scores_student.detach().mean() * self.n_data
                self.normalizer[1] = scores_teacher.detach().mean() * self.n_data
            z = self.normalizer.clone()
            with torch.no_grad():
                # Out of place: the old banks are saved by the products above for the backward pass.
                self.memory_student = self._updated(self.memory_student, student, index)
                self.memory_teacher = self._updated(self.memory_teacher, teacher, index)
        return scores_student / z[0], scores_teacher / z[1]

    def _updated(self, memory: torch.Tensor, embeddings: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``memory`` with rows ``index`` moved towards ``embeddings`` and renormalised to unit length."""
        moved = memory[index] * self.momentum + embeddings.detach() * (1 - self.momentum)
        return memory.index_copy(0, index, moved / moved.norm(dim=1, keepdim=True))


class OtherClassSampler(nn.Module):
    """Draws negatives for CRD: ``K`` training-split indices of samples of *other* classes per anchor.

    RepDistiller's ``CIFAR100InstanceSample`` (mode ``exact``) draws them in the data loader from
    ``cls_negative[target]``; here they are drawn on the batch's device with torch's random stream,
    uniformly and with replacement, in one vectorised step: the training indices are sorted by
    class, and a uniform position among the ``N - n_c`` samples outside class ``c`` skips over the
    block of class ``c``.
    """

    order: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor

    def __init__(self, targets: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        targets = torch.as_tensor(targets, dtype=torch.long).flatten()
        if targets.numel() == 0:
            raise ValueError("the training split is empty: there are no samples to draw negatives from")
        counts = torch.bincount(targets, minlength=num_classes)
        if (counts == targets.numel()).any():
            raise ValueError(
                "all training samples have the same class, so there are no other-class samples to draw"
                " contrastive negatives from"
            )
        # Derived from the labels, so not saved in checkpoints (persistent=False).
        self.register_buffer("order", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("counts", counts, persistent=False)

    def forward(self, classes: torch.Tensor, k: int) -> torch.Tensor:
        """``[B, k]`` indices into the training split, none of class ``classes[b]`` in row ``b``."""
        classes = classes.to(self.counts.device)
        count = self.counts[classes][:, None]
        pool = self.order.numel() - count
        draws = torch.rand(classes.shape[0], k, dtype=torch.float64, device=self.order.device)
        position = torch.minimum((draws * pool).long(), pool - 1)
        position = position + (position >= self.starts[classes][:, None]) * count
        return self.order[position]
