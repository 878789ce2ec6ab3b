"""`kdlab teacher-report`: on real teacher runs, the numbers it prints are the teachers' own and the
agreement matrix is the fraction of equal predictions; runs it cannot report are refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.cli import main
from kdlab.pipeline import run_experiment
from kdlab.teachers.report import agreement

TINY = ["teacher.train.epochs=2", "student.train.epochs=1", "runtime.wandb=disabled", "runtime.progress=false"]


def test_agreement_is_the_fraction_of_equal_predictions() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])  # predicts 0 1 0 1
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 0 0 0 1
    matrix = agreement([a, b])
    assert matrix.tolist() == [[1.0, 0.75], [0.75, 1.0]]


def test_report_of_two_teachers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    outcomes = [
        run_experiment(load_experiment("mnist1d-kd", [f"runtime.runs_dir={runs}", f"seed={seed}", *TINY]))
        for seed in (0, 1)
    ]
    teachers = [str(o.teacher_run.dir) for o in outcomes]
    assert main(["teacher-report", *teachers, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "teacher-report.md").read_text()
    for outcome in outcomes:  # the accuracy the teacher run itself measured on the test split
        assert f"| {outcome.teacher['test/top1']:.3f} |" in markdown
    assert "ensemble of 2 (mean probabilities)" in markdown and "| T0 | 1.000 |" in markdown
    for name in ("teacher-report.png", "teacher-agreement.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"

    student = str(outcomes[0].student_run.dir)
    assert main(["teacher-report", student]) == 2
    assert "is a student run, not a teacher run" in capsys.readouterr().err
    assert main(["teacher-report", str(tmp_path)]) == 2
    assert "not a kdlab run folder" in capsys.readouterr().err
