"""Response-based losses: the student matches the teacher's output distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015: ``T^2 * mean_batch KL(softmax(t/T) || softmax(s/T))``.

    The ``T^2`` factor keeps the gradient scale independent of ``T``, as in the paper and in
    RepDistiller's ``DistillKL`` (sum over classes, mean over the batch).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2
