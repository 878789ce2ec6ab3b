"""kd_loss against Hinton et al.'s formula, written out independently in float64."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import kd_loss


def _paper_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """T^2 * (1/B) * sum_b sum_c q_c log(q_c / p_c), q = softmax(t/T), p = softmax(s/T), by loops."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p = [v / sum(s_exp) for v in s_exp]
        q = [v / sum(t_exp) for v in t_exp]
        total += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p, strict=True))
    return temperature**2 * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_kd_loss_matches_the_paper_formula(temperature: float, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch * 10 + int(temperature))
    student = torch.randn(batch, 7, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(batch, 7, generator=generator, dtype=torch.float64) * 3
    value = kd_loss(student, teacher, temperature)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_paper_kd(student, teacher, temperature), rel=1e-12, abs=1e-14)


def test_kd_loss_gradient_is_T_times_probability_gap() -> None:
    """Hinton et al. eq. 2 times T^2: dL/dz_i = T (p_i - q_i) / B."""
    temperature = 4.0
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    kd_loss(student, teacher, temperature).backward()
    gap = torch.softmax(student.detach() / temperature, -1) - torch.softmax(teacher / temperature, -1)
    torch.testing.assert_close(student.grad, temperature * gap / 3, rtol=1e-12, atol=1e-14)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    logits = torch.randn(4, 10, dtype=torch.float64)
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-14)
    assert kd_loss(logits, logits + torch.randn_like(logits)).item() > 0
    # softmax is shift-invariant, so is the loss
    assert kd_loss(logits + 5.0, logits).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_loss_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=0.0)
