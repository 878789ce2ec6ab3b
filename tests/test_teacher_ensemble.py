"""Deep ensembles as one teacher: the averaged-probability formula, member runs shared with single
teachers, use by offline and multi-teacher schemes, and clear refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.catalog import load_experiment
from kdlab.config import ExperimentConfig
from kdlab.errors import ConfigError
from kdlab.pipeline import plan_experiment, run_experiment
from kdlab.teachers.ensemble import ENSEMBLE_SEED_OFFSET, DeepEnsemble

FAST = ["teacher.train.epochs=1", "student.train.epochs=1", "runtime.wandb=disabled", "runtime.progress=false"]


def _config(runs: Path, *overrides: str, name: str = "mnist1d-kd") -> ExperimentConfig:
    return load_experiment(name, [f"runtime.runs_dir={runs}", *FAST, *overrides])


@pytest.mark.parametrize("vectorize", [True, False])
def test_ensemble_logits_are_the_log_of_the_averaged_probabilities(vectorize: bool) -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).double() for _ in range(3)]
    inputs = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = sum(torch.softmax(m(inputs), dim=1) for m in members) / 3
        got = DeepEnsemble(members, vectorize=vectorize)(inputs)
    assert torch.allclose(got.exp(), expected, atol=1e-12)
    assert torch.allclose(got.softmax(1), expected, atol=1e-12)


def test_an_ensemble_needs_two_members() -> None:
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        DeepEnsemble([nn.Linear(2, 2)])


def test_ensemble_teacher_trains_its_members_as_teacher_runs(tmp_path: Path) -> None:
    single = plan_experiment(_config(tmp_path))
    plan = plan_experiment(_config(tmp_path, "teacher.ensemble=2"))
    (teacher,) = plan.teachers
    assert teacher.runs[0] == single.teacher_run  # member 0 is the single teacher
    assert [run.spec["seed"] for run in teacher.runs] == [0, ENSEMBLE_SEED_OFFSET]
    assert plan.student_run.spec["teacher"] == {"ensemble": [run.hash for run in teacher.runs]}
    outcome = run_experiment(plan.config)
    assert all(run.is_finished() for run in teacher.runs)
    metrics = outcome.teacher
    members = [run.metrics()["test/top1"] for run in teacher.runs]
    assert metrics["ensemble"] == 2 and metrics["members/test/top1"] == members
    assert 0 <= metrics["test/top1"] <= 100 and math.isfinite(metrics["test/nll"])
    assert math.isfinite(outcome.student["test/top1"])


def test_multi_teacher_takes_an_ensemble_as_one_of_its_teachers(tmp_path: Path) -> None:
    plan = plan_experiment(_config(tmp_path, "teachers=[{ensemble: 2},{}]", name="mnist1d-multi-teacher"))
    assert [len(t.runs) for t in plan.teachers] == [2, 1]
    assert "ensemble" in plan.student_run.spec["teachers"][0] and "run" in plan.student_run.spec["teachers"][1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.ensemble=2", "method.name=fitnet"], "a deep ensemble has only averaged probabilities"),
        (["teacher.ensemble=0"], "teacher.ensemble must be at least 1 (members), got 0"),
        (["teacher.ensemble=2", "teacher.source=cache"], "stores hold single teacher runs"),
        (["teacher.ensemble=2", "teacher.use_calibrated_logits=true"], "its members have temperatures of their own"),
    ],
)
def test_ensemble_misuse_is_refused(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_experiment(_config(tmp_path, *overrides))
