"""`kdlab run` end to end on MNIST-1D: run folders, reuse by config hash, shared teachers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.cli import main
from kdlab.config import ExperimentConfig
from kdlab.pipeline import Outcome, plan_experiment, run_experiment

FAST = ["teacher.train.epochs=2", "student.train.epochs=2", "runtime.wandb=disabled", "runtime.progress=false"]


def _config(runs: Path, name: str = "mnist1d-kd", *overrides: str) -> ExperimentConfig:
    return load_experiment(name, [f"runtime.runs_dir={runs}", *FAST, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Outcome]:
    runs = tmp_path_factory.mktemp("runs")
    return runs, run_experiment(_config(runs))


def test_run_folders_hold_everything(finished: tuple[Path, Outcome]) -> None:
    runs, outcome = finished
    teacher, student = outcome.teacher_run.dir, outcome.student_run.dir
    assert teacher.parent == runs / "teachers" and student.parent == runs / "mnist1d-kd"
    for folder in (teacher, student):
        for name in ("config.yaml", "metrics.json", "model.pt", "status.json", "checkpoints/last.ckpt"):
            assert (folder / name).is_file(), f"{folder}/{name} missing"
        assert json.loads((folder / "status.json").read_text())["state"] == "done"
        assert list((folder / "logs" / "attempt-1").glob("metrics.csv"))
    for png in (teacher / "reliability.png", teacher / "curves.png", student / "curves.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    calibration = json.loads((teacher / "calibration.json").read_text())
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert set(calibration) >= {"before", "after"}
    metrics = outcome.student
    assert 0 <= metrics["test/top1"] <= 100 and metrics["params"] == 15_210 and metrics["epochs"] == 2
    assert outcome.teacher["test/top1_calibrated"] == pytest.approx(outcome.teacher["test/top1"])


def test_identical_config_reuses_finished_runs(
    finished: tuple[Path, Outcome], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, outcome = finished
    stamp = outcome.student_run.metrics_path.stat().st_mtime_ns
    again = run_experiment(_config(runs))
    assert "teacher: reusing finished run" in capsys.readouterr().out
    assert again.student == outcome.student and again.student_run.dir == outcome.student_run.dir
    assert outcome.student_run.metrics_path.stat().st_mtime_ns == stamp


def test_students_share_a_teacher_by_its_config_hash(
    finished: tuple[Path, Outcome], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, outcome = finished
    other = run_experiment(_config(runs, "mnist1d-kd", "method.params.temperature=2.0"))
    out = capsys.readouterr().out
    assert f"teacher: reusing finished run {outcome.teacher_run.dir}" in out
    assert other.student_run.dir != outcome.student_run.dir
    assert other.teacher_run.dir == outcome.teacher_run.dir


def test_hashes_follow_what_changes_the_numbers(tmp_path: Path) -> None:
    base = plan_experiment(_config(tmp_path))
    longer_teacher = plan_experiment(_config(tmp_path, "mnist1d-kd", "teacher.train.epochs=3"))
    assert longer_teacher.teacher_run.dir != base.teacher_run.dir
    assert longer_teacher.student_run.dir != base.student_run.dir  # its teacher changed
    quiet = plan_experiment(_config(tmp_path, "mnist1d-kd", "runtime.log_every_n_steps=50"))
    assert quiet.student_run.dir == base.student_run.dir  # runtime settings never change a hash
    vanilla = plan_experiment(_config(tmp_path, "mnist1d-ce"))
    vanilla_other_teacher = plan_experiment(_config(tmp_path, "mnist1d-ce", "teacher.train.epochs=3"))
    assert vanilla.teacher_run is None and vanilla.student_run.dir == vanilla_other_teacher.student_run.dir


def test_a_teacher_checkpoint_is_loaded_and_calibrated_not_trained(
    finished: tuple[Path, Outcome], tmp_path: Path
) -> None:
    _, outcome = finished
    model_file = outcome.teacher_run.model_path
    result = run_experiment(_config(tmp_path, "mnist1d-kd", f"teacher.checkpoint={model_file}"))
    assert "epochs" not in result.teacher  # nothing was trained
    assert result.teacher["test/top1"] == pytest.approx(outcome.teacher["test/top1"])
    saved = torch.load(result.teacher_run.model_path, weights_only=False)
    assert saved["temperature"] == pytest.approx(outcome.teacher["calibration/temperature"], rel=1e-6)


def test_cli_run_prints_the_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "mnist1d-ce", f"runtime.runs_dir={tmp_path}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "student" in out and "top1" in out and str(tmp_path) in out


@pytest.mark.slow
def test_parallel_runs_of_one_config_train_it_once(tmp_path: Path) -> None:
    """Two processes (say, two sweep cells) starting the same run: one trains, the other reuses."""
    command = [str(Path(sys.executable).parent / "kdlab"), "run", "mnist1d-ce", f"runtime.runs_dir={tmp_path}", *FAST]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2))
    outputs = [first.communicate()[0], second.communicate()[0]]
    assert first.returncode == second.returncode == 0
    assert sum("reusing finished run" in out for out in outputs) == 1
    (metrics,) = tmp_path.glob("mnist1d-ce/*/metrics.json")
    assert json.loads(metrics.read_text())["attempts"] == 1


def test_initialisation_stage_runs_first_in_its_own_sub_run(tmp_path: Path) -> None:
    """AB's connector stage (2 epochs here) runs as <student run>/init, then the main training."""
    config = _config(tmp_path, "mnist1d-zoo", "method.name=ab", "method.params.init_epochs=2")
    outcome = run_experiment(config)
    init = outcome.student_run.dir / "init"
    assert json.loads((init / "status.json").read_text())["state"] == "done"
    init_metrics = json.loads((init / "metrics.json").read_text())
    assert init_metrics["epochs"] == 2 and "test/top1" not in init_metrics  # the init stage is not tested
    assert "train/ab" in (init / "logs" / "attempt-1" / "metrics.csv").read_text().splitlines()[0]
    state = torch.load(init / "state.pt", weights_only=False)
    fresh = plan_experiment(config).student.state_dict()
    changed = [k for k, v in state["student"].items() if v.dtype.is_floating_point and not torch.equal(v, fresh[k])]
    assert changed and not any(k.startswith("fc.") for k in changed)  # AB trains the feature layers only
    assert outcome.student["epochs"] == 2 and outcome.student_run.is_finished()
