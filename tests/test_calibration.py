"""Temperature, vector and Platt scaling (Guo et al. 2017) on synthetic over-, under- and class-wise
miscalibrated logits; MCE and the Brier score on known cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.errors import ConfigError
from kdlab.metrics import evaluate_logits
from kdlab.pipeline import plan_experiment, run_experiment
from kdlab.teachers.calibration import MatrixScaling, VectorScaling, calibration_report, fit_calibrator, fit_temperature


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


def test_mce_and_brier_of_a_known_case() -> None:
    """Both samples at confidence 0.9, one right: one bin, MCE = 40%; Brier = ((.1² + .1²) + (.9² + .9²)) / 2."""
    logits = torch.tensor([[0.0, torch.log(torch.tensor(9.0))]] * 2)
    metrics = evaluate_logits(logits, torch.tensor([1, 0]))
    assert metrics["mce"] == pytest.approx(40.0, abs=1e-4)
    assert metrics["brier"] == pytest.approx((0.02 + 1.62) / 2, rel=1e-5)


def test_vector_and_platt_maps_are_their_formulas() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64)
    vector, platt = VectorScaling(4).double(), MatrixScaling(4).double()
    with torch.no_grad():
        vector.scale.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
        vector.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        platt.weight.copy_(torch.randn(4, 4))
        platt.bias.copy_(torch.randn(4))
        expected_vector = torch.stack([logits[:, c] * vector.scale[c] + vector.bias[c] for c in range(4)], dim=1)
        expected_platt = torch.einsum("kc,nc->nk", platt.weight, logits) + platt.bias
        assert torch.allclose(vector(logits), expected_vector)
        assert torch.allclose(platt(logits), expected_platt)


def _class_distorted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits, then each class scaled and shifted differently (class-wise miscalibration)."""
    logits, labels = _calibrated_logits(n, 10, seed)
    scale = torch.linspace(0.3, 3.0, 10, dtype=torch.float64)
    bias = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)
    return logits * scale + bias, labels


@pytest.mark.parametrize("method", ["temperature", "vector", "platt"])
@pytest.mark.parametrize("distortion", ["over", "under", "per-class"])
def test_every_calibration_method_lowers_ece_on_held_out_logits(method: str, distortion: str) -> None:
    if distortion == "per-class":
        logits, labels = _class_distorted(20_000, seed=2)
    else:
        logits, labels = _calibrated_logits(20_000, 10, seed=3)
        logits = logits * (3.0 if distortion == "over" else 0.4)
    calibrator = fit_calibrator(method, logits[:10_000], labels[:10_000])
    report = calibration_report(logits[10_000:], labels[10_000:], calibrator)
    assert report["after"]["ece"] < report["before"]["ece"] / 2, (method, distortion, report)
    assert report["after"]["nll"] < report["before"]["nll"]
    assert report["after"]["brier"] < report["before"]["brier"]


def test_vector_scaling_beats_temperature_on_class_wise_miscalibration() -> None:
    logits, labels = _class_distorted(20_000, seed=4)
    nll = {
        method: calibration_report(
            logits[10_000:], labels[10_000:], fit_calibrator(method, logits[:10_000], labels[:10_000])
        )["after"]["nll"]
        for method in ("temperature", "vector")
    }
    assert nll["vector"] < nll["temperature"]


@pytest.mark.parametrize("method", ["vector", "platt"])
def test_a_teacher_run_fits_and_reports_the_configured_calibration(tmp_path: Path, method: str) -> None:
    overrides = [
        f"runtime.runs_dir={tmp_path}",
        "runtime.wandb=disabled",
        "teacher.train.epochs=2",
        "student.train.epochs=1",
        f"teacher.calibration.method={method}",
    ]
    outcome = run_experiment(load_experiment("mnist1d-kd", overrides))
    teacher = outcome.teacher
    assert teacher is not None and "calibration/temperature" not in teacher
    assert teacher["test/nll_calibrated"] < teacher["test/nll"]
    for key in ("test/mce", "test/brier", "test/mce_calibrated", "test/brier_calibrated"):
        assert key in teacher
    report = json.loads((outcome.teacher_run.dir / "calibration.json").read_text())
    assert report["method"] == method and "bias" in report
    assert (outcome.teacher_run.dir / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrated_logits_need_temperature_scaling(tmp_path: Path) -> None:
    overrides = [
        f"runtime.runs_dir={tmp_path}",
        "teacher.calibration.method=vector",
        "teacher.use_calibrated_logits=true",
    ]
    with pytest.raises(ConfigError, match=r"needs calibration\.method=temperature, not 'vector'"):
        plan_experiment(load_experiment("mnist1d-kd", overrides))
