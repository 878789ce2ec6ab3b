"""Bad input: one line naming the problem, a non-zero exit, nothing trained, nothing overwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.methods import METHODS
from kdlab.runs import TEACHER_GROUP

KDLAB = str(Path(sys.executable).parent / "kdlab")


def _fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("kdlab: error: ") and "\n" not in err, err
    return err.removeprefix("kdlab: error: ")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method.name=kdd"], "unknown method 'kdd'; did you mean 'kd'"),
        (["student.model.name=mnist1d_mlpp"], "student: unknown model 'mnist1d_mlpp'; did you mean 'mnist1d_mlp'"),
        (["teacher.model.name=resnet32x5"], "teacher: unknown model 'resnet32x5'; did you mean 'resnet32x4'"),
        (["data.name=mnist2d"], "unknown dataset 'mnist2d'; did you mean 'mnist1d'"),
        (["student.train.epochs=abc"], "override 'student.train.epochs=abc': bad 'student.train.epochs'"),
        (["student.train.epoch=3"], "Did you mean: 'epochs'"),
        (["method.params.temprature=2"], "method 'kd': unknown option 'temprature'; did you mean 'temperature'"),
        (["method.params.temperature=-1"], "method 'kd': temperature must be positive"),
        (["method.weights.kdd=1"], "method 'kd' has no loss term 'kdd'; did you mean 'kd'"),
        (
            ["teacher.model.kwargs.num_classes=5"],
            "num_classes mismatch: teacher outputs 5 classes",
        ),
        (["student.model.kwargs.hidden=x"], "model 'mnist1d_mlp': option 'hidden' must be int"),
        (
            ["student.model.name=resnet8"],
            "cannot take MNIST1DDataModule inputs of shape [40]",
        ),
        (["data.kwargs.num_sample=10"], "dataset 'mnist1d': unknown option 'num_sample'; did you mean 'num_samples'"),
        (["student.train.optimizer.name=adamm"], "unknown optimizer 'adamm'; did you mean 'adam'"),
        (["teacher.checkpoint=/nonexistent/teacher.pt"], "checkpoint /nonexistent/teacher.pt does not exist"),
        (
            ["teacher.train.optimizer.sam=sam", "teacher.train.precision=16-mixed"],
            "teacher: optimizer.sam does not work with precision '16-mixed'",
        ),
        (["teacher.train.optimizer.sam=sma"], "unknown optimizer.sam 'sma'"),
        (["runtime.wandb=sometimes"], "runtime.wandb must be one of auto, online, offline, disabled"),
        (["method.name=at"], "method 'at' cannot use these models' features: feature maps must both be"),
        (["method.name=fsp"], "method 'fsp': the student has 1 stem/stage outputs and the teacher 3"),
        (["method.name=ab", "student.model.name=mnist1d_gru"], "student (MNIST1DGRU) has no pre-activation features"),
        (["method.name=fitnet", "student.model.name=mnist1d_gru"], "student (MNIST1DGRU) has no stages"),
        (["method.name=fitnet", "method.params.hint=layer9"], "has no layer 'layer9'"),
    ],
)
def test_bad_input_fails_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    runs = tmp_path / "runs"
    message = _fail(capsys, "run", "mnist1d-kd", f"runtime.runs_dir={runs}", *overrides)
    assert expected in message
    assert not runs.exists(), "a failed validation must not create run folders"


def test_unknown_experiment_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unknown experiment 'mnist1d-kdd'; did you mean 'mnist1d-kd'" in _fail(capsys, "run", "mnist1d-kdd")
    assert "unknown table 'mnist1d-k'; did you mean 'mnist1d-kd'" in _fail(capsys, "table", "mnist1d-k")


def test_corrupt_checkpoint_is_named_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    args = ["run", "mnist1d-kd", f"runtime.runs_dir={runs}", "runtime.wandb=disabled"]
    assert main([*args, "--dry-run"]) == 0
    student_dir = Path(capsys.readouterr().out.split("student run: ")[1].split(" (")[0])
    checkpoint = student_dir / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    message = _fail(capsys, *args)
    assert message.startswith(f"corrupt checkpoint {checkpoint}: ") and "delete it" in message
    assert checkpoint.read_bytes() == b"not a checkpoint"
    assert not (runs / TEACHER_GROUP).exists(), "the teacher must not train when the student cannot resume"
    assert not list(runs.rglob("metrics.json"))


def test_corrupt_teacher_checkpoint_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"\x00garbage")
    message = _fail(capsys, "run", "mnist1d-kd", f"runtime.runs_dir={tmp_path / 'runs'}", f"teacher.checkpoint={bad}")
    assert message.startswith(f"corrupt checkpoint {bad}")


def test_entry_point_exit_code_and_single_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [KDLAB, "run", "mnist1d-kd", "method.name=kdd", f"runtime.runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kdlab: error: unknown method 'kdd'; did you mean 'kd'")
    assert line.endswith(f"(valid: {', '.join(METHODS.names())})")
    assert not any(tmp_path.iterdir())
