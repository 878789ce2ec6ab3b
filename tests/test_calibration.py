"""Temperature scaling (Guo et al. 2017) on synthetic over- and under-confident logits."""

from __future__ import annotations

import pytest
import torch

from kdlab.metrics import evaluate_logits
from kdlab.teachers.calibration import calibration_report, fit_temperature


def _calibrated_logits(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution: labels are sampled from it."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * 2.0
    labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("distortion", [3.0, 0.4])  # over-confident (sharpened) and under-confident
def test_temperature_scaling_recovers_the_distortion_and_lowers_ece(distortion: float) -> None:
    logits, labels = _calibrated_logits(20_000, 10, seed=0)
    distorted = logits * distortion
    temperature = fit_temperature(distorted[:10_000], labels[:10_000])  # fit on a held-out half
    assert temperature == pytest.approx(distortion, rel=0.08)
    report = calibration_report(distorted[10_000:], labels[10_000:], temperature)
    assert report["after"]["ece"] < report["before"]["ece"] / 3
    assert report["after"]["nll"] < report["before"]["nll"]
    assert report["after"]["top1"] == report["before"]["top1"]  # scaling never changes the argmax


def test_calibrated_logits_keep_temperature_near_one() -> None:
    logits, labels = _calibrated_logits(20_000, 10, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.06)


def test_ece_of_a_known_case() -> None:
    """Two samples, both predicted with confidence 0.9, one right: ECE = |0.5 - 0.9| = 40%."""
    logits = torch.tensor([[0.0, torch.log(torch.tensor(9.0))]] * 2)
    labels = torch.tensor([1, 0])
    assert evaluate_logits(logits, labels)["ece"] == pytest.approx(40.0, abs=1e-4)
    assert evaluate_logits(logits, labels)["top1"] == pytest.approx(50.0)
