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


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    With ``p = softmax(z / T)`` and ``t`` the label of each sample:

    - TCKD = ``KL(b_teacher || b_student)`` between the binary distributions ``b = [p_t, 1 - p_t]``
      (target class vs all the others);
    - NCKD = ``KL(p̂_teacher || p̂_student)`` between the distributions over the non-target classes,
      renormalised (``p̂_i = p_i / (1 - p_t)``, ``i != t``).

    As in mdistiller's ``dkd_loss``: ``1 - p_t`` is the sum of the non-target probabilities, the
    non-target softmax is taken after subtracting 1000 from the target logit (its probability
    underflows to zero unless ``z / T`` spans hundreds), each KL is summed over classes, averaged
    over the batch and scaled by ``T^2``. The warm-up of the DKD term is the method's, not this
    function's.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    target_mask = F.one_hot(target.reshape(-1), student_logits.shape[-1]).to(student_logits.dtype)
    p_student = F.softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    binary_student = _target_vs_rest(p_student, target_mask)
    binary_teacher = _target_vs_rest(p_teacher, target_mask)
    batch = student_logits.shape[0]
    tckd = F.kl_div(torch.log(binary_student), binary_teacher, reduction="sum") / batch
    log_rest_student = F.log_softmax(student_logits / temperature - 1000.0 * target_mask, dim=-1)
    rest_teacher = F.softmax(teacher_logits / temperature - 1000.0 * target_mask, dim=-1)
    nckd = F.kl_div(log_rest_student, rest_teacher, reduction="sum") / batch
    return (alpha * tckd + beta * nckd) * temperature**2


def _target_vs_rest(probabilities: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """``[p_t, sum_{i != t} p_i]`` per sample: DKD's binary target/non-target distribution."""
    target = (probabilities * target_mask).sum(dim=-1, keepdim=True)
    rest = (probabilities * (1 - target_mask)).sum(dim=-1, keepdim=True)
    return torch.cat([target, rest], dim=-1)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): match relations, not values, of the predictions.

    With ``Y = softmax(Z / tau)`` (batch x classes) and ``d(u, v) = 1 - pearson(u, v)``:

    - inter-class relation: ``mean_i d(Y_s[i, :], Y_t[i, :])`` (each sample's class ranking);
    - intra-class relation: ``mean_j d(Y_s[:, j], Y_t[:, j])`` (each class's ranking over the batch);

    loss = ``tau^2 * (beta * inter + gamma * intra)``. As in the authors' ``dist_kd.py``, Pearson's
    r is the cosine of the centred vectors with ``1e-8`` added to the product of their norms, so
    identical inputs give ``1 - n / (n + 1e-8)`` (about zero, not exactly), and a constant vector
    gives ``r = 0``: in particular the intra-class term of a batch of one sample is exactly
    ``tau^2 * gamma`` with zero gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    p_student = F.softmax(student_logits / temperature, dim=-1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    inter = 1 - _pearson_rows(p_student, p_teacher).mean()
    intra = 1 - _pearson_rows(p_student.T, p_teacher.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (DIST's eps convention)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each sample's logits over the classes: ``(z - mean(z)) / (eps + std(z))``.

    Sun et al. (CVPR 2024) use the unbiased standard deviation (``torch.std``'s default) with
    ``eps`` added to it, as here.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


def standardized_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """Logit-standardised KD (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024).

    :func:`kd_loss` on :func:`standardize_logits` of both models: the student matches the
    teacher's logit *relations* and is free to use its own logit range. ``temperature`` is the
    paper's base temperature (2 for most CIFAR-100 pairs in the authors' repo), and the ``T^2``
    scaling, sum over classes and batch mean are kept as in their ``kd_loss``.
    """
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits), temperature)
