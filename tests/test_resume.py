"""Kill-and-resume: a run SIGKILLed mid-training and rerun finishes with the *same* numbers as one
that was never interrupted, keeps the first attempt's logs, and says that it resumed.

The comparison is exact (``==`` on the floats in metrics.json), not approximate: both runs execute
the same float operations in the same order on the same CPU with one thread, so any difference at
all means resume restored something incompletely (weights, optimiser, schedule, RNG streams), and a
tolerance would hide exactly the bug this test exists to catch.

Runs use ``runtime.threads=1`` (runtime options are not in the config hash): on a shared two-core
machine two intra-op threads spin against each other and make a 15k-parameter MLP ~25x slower, and
a fixed thread count also fixes the order of floating-point reductions.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

KDLAB = Path(sys.executable).parent / "kdlab"
# deterministic: on a GPU, cuDNN/cuBLAS pick non-deterministic kernels by default and two
# uninterrupted runs already differ in the last bits (seen on an H200); CPU runs are exact anyway.
RUNTIME = ("runtime.progress=false", "runtime.wandb=disabled", "runtime.threads=1", "runtime.deterministic=true")
COMPARED = ("test/top1", "test/nll", "test/ece", "val/top1", "val/nll", "val/ece")
KILL_AFTER_EPOCH = 3
STUDENT_EPOCHS = 40  # ~0.15 s each on one thread: long enough to kill mid-training, short to rerun
TEACHER_EPOCHS = 12


def kdlab_command(experiment: str, runs_dir: Path, *overrides: str) -> list[str]:
    return [str(KDLAB), "run", experiment, f"runtime.runs_dir={runs_dir}", *overrides, *RUNTIME]


def run_to_completion(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"kdlab failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def saved_epoch(checkpoint: Path) -> int | None:
    """The epoch stored in a checkpoint; None while it does not exist yet."""
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError, pickle.UnpicklingError):  # not yet, or mid-rename
        return None


def kill_after_epoch(command: list[str], cwd: Path, checkpoints: str, min_epoch: int, epochs: int) -> int:
    """Start ``command``, SIGKILL it once a ``last.ckpt`` matching the glob ``checkpoints`` (relative
    to ``cwd``) holds ``min_epoch`` or later, and return the epoch seen: a crash, not a clean stop.

    The kill must land mid-training: a checkpoint first seen at the last epoch means none was
    written per epoch, so a crash would have restarted training from scratch."""
    log = open(cwd / "killed-run.log", "w")  # noqa: SIM115 - closed below, after the process is gone
    process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, (
                f"kdlab exited ({process.returncode}) before epoch {min_epoch}; raise the epochs:\n"
                + (cwd / "killed-run.log").read_text()
            )
            seen = [e for e in map(saved_epoch, cwd.glob(checkpoints)) if e is not None]
            if seen and max(seen) >= min_epoch:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                assert max(seen) < epochs - 1, (
                    f"the first checkpoint seen holds epoch {max(seen)} of {epochs}: last.ckpt is not"
                    " written after every epoch, so a killed run cannot resume mid-training"
                )
                return max(seen)
            time.sleep(0.02)
        raise AssertionError(f"no checkpoint at epoch {min_epoch} within 300 s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def only_dir(parent: Path) -> Path:
    found = sorted(p for p in parent.iterdir() if p.is_dir())
    assert len(found) == 1, found
    return found[0]


def metrics_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_numbers(resumed: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    differing = {
        key: (resumed.get(key), uninterrupted.get(key))
        for key in COMPARED
        if key not in resumed or resumed.get(key) != uninterrupted.get(key)
    }
    assert not differing, f"resumed != uninterrupted (resumed, uninterrupted): {differing}"
    assert resumed["epochs"] == uninterrupted["epochs"]


def validated_epochs(csv_file: Path) -> set[int]:
    """The epochs that have a ``val/top1`` row in one attempt's CSV log."""
    with open(csv_file, newline="") as handle:
        return {int(row["epoch"]) for row in csv.DictReader(handle) if row.get("val/top1")}


def assert_resumed(run_dir: Path, killed_at: int) -> None:
    """Two attempts, the second from the killed one's checkpoint, and no epoch missing from the logs."""
    metrics = metrics_of(run_dir)
    assert metrics["attempts"] == 2
    assert metrics["resumed_from_epoch"] is not None, "the rerun started from scratch"
    assert metrics["resumed_from_epoch"] >= max(KILL_AFTER_EPOCH, killed_at)
    logs = [run_dir / "logs" / f"attempt-{attempt}" / "metrics.csv" for attempt in (1, 2)]
    for log in logs:
        assert log.is_file(), f"{log} lost"
    first, second = (validated_epochs(log) for log in logs)
    assert set(range(KILL_AFTER_EPOCH + 1)) <= first, f"the killed attempt's log lost epochs: {sorted(first)}"
    assert first | second == set(range(metrics["epochs"])), "an epoch is missing from both attempts' logs"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


def test_student_killed_and_resumed_matches_uninterrupted(tmp_path: Path) -> None:
    epochs = f"student.train.epochs={STUDENT_EPOCHS}"
    resumed_runs, clean_runs = tmp_path / "A", tmp_path / "B"

    killed_at = kill_after_epoch(
        kdlab_command("mnist1d-ce", resumed_runs, epochs),
        tmp_path,
        "A/mnist1d-ce/*/checkpoints/last.ckpt",
        KILL_AFTER_EPOCH,
        STUDENT_EPOCHS,
    )
    run_dir = only_dir(resumed_runs / "mnist1d-ce")
    assert not (run_dir / "metrics.json").exists(), "a killed run must not look finished"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"

    run_to_completion(kdlab_command("mnist1d-ce", resumed_runs, epochs), tmp_path)
    run_to_completion(kdlab_command("mnist1d-ce", clean_runs, epochs), tmp_path)

    clean_dir = only_dir(clean_runs / "mnist1d-ce")
    assert clean_dir.name == run_dir.name, "same config, same run hash"
    assert_resumed(run_dir, killed_at)
    assert metrics_of(clean_dir)["attempts"] == 1
    assert_same_numbers(metrics_of(run_dir), metrics_of(clean_dir))


def test_teacher_killed_and_resumed_gives_the_same_student(tmp_path: Path) -> None:
    epochs = (f"teacher.train.epochs={TEACHER_EPOCHS}", "student.train.epochs=3")
    resumed_runs, clean_runs = tmp_path / "A", tmp_path / "B"

    killed_at = kill_after_epoch(
        kdlab_command("mnist1d-kd", resumed_runs, *epochs),
        tmp_path,
        "A/teachers/*/checkpoints/last.ckpt",
        KILL_AFTER_EPOCH,
        TEACHER_EPOCHS,
    )
    teacher_dir = only_dir(resumed_runs / "teachers")
    assert not (teacher_dir / "metrics.json").exists()
    assert not (resumed_runs / "mnist1d-kd").exists() or not list((resumed_runs / "mnist1d-kd").iterdir())

    run_to_completion(kdlab_command("mnist1d-kd", resumed_runs, *epochs), tmp_path)
    run_to_completion(kdlab_command("mnist1d-kd", clean_runs, *epochs), tmp_path)

    assert_resumed(teacher_dir, killed_at)
    clean_teacher = only_dir(clean_runs / "teachers")
    assert_same_numbers(metrics_of(teacher_dir), metrics_of(clean_teacher))
    for key in ("calibration/temperature", "test/nll_calibrated", "test/ece_calibrated"):
        assert metrics_of(teacher_dir)[key] == metrics_of(clean_teacher)[key], key

    student, clean_student = only_dir(resumed_runs / "mnist1d-kd"), only_dir(clean_runs / "mnist1d-kd")
    assert student.name == clean_student.name
    assert metrics_of(student)["attempts"] == 1, "only the teacher was interrupted"
    assert_same_numbers(metrics_of(student), metrics_of(clean_student))


def test_crash_after_the_last_epoch_still_reports_validation(tmp_path: Path) -> None:
    """A crash after the final checkpoint but before metrics.json (while testing or saving model.pt)
    leaves a checkpoint with training complete; the rerun must still report every metric.

    The state is made by deleting what the finished run wrote after its last checkpoint, since a
    real kill would have to land in a window of a fraction of a second."""
    command = kdlab_command("mnist1d-ce", tmp_path / "A", "student.train.epochs=4")
    run_to_completion(command, tmp_path)
    run_dir = only_dir(tmp_path / "A" / "mnist1d-ce")
    finished = metrics_of(run_dir)
    (run_dir / "metrics.json").unlink()
    (run_dir / "model.pt").unlink()

    run_to_completion(command, tmp_path)
    assert metrics_of(run_dir)["attempts"] == 2
    assert (run_dir / "model.pt").is_file()
    assert_same_numbers(metrics_of(run_dir), finished)


@pytest.mark.parametrize(
    ("experiment", "extra"),
    [
        ("mnist1d-adversarial", ()),  # two optimisers, manual optimisation, a scheduler it steps itself
        ("mnist1d-dml", ()),  # peers outside the student
        ("mnist1d-byot", ()),  # exit heads
        ("mnist1d-quantized", ()),  # quantisation observers, frozen for the last epochs
        ("mnist1d-zoo", ("callbacks=[{name: ctkd}]",)),  # a learnable temperature added by a callback
    ],
)
def test_scheme_state_survives_a_kill(tmp_path: Path, experiment: str, extra: tuple[str, ...]) -> None:
    """Everything a scheme adds to the student (discriminator, peers, exits, observers, callback
    parameters, their optimiser states) is in the checkpoint: a resumed run equals an uninterrupted one."""
    epochs = 12
    overrides = ("teacher.train.epochs=2", f"student.train.epochs={epochs}", *extra)
    resumed_runs, clean_runs = tmp_path / "A", tmp_path / "B"
    killed_at = kill_after_epoch(
        kdlab_command(experiment, resumed_runs, *overrides),
        tmp_path,
        f"A/{experiment}/*/checkpoints/last.ckpt",
        KILL_AFTER_EPOCH,
        epochs,
    )
    run_to_completion(kdlab_command(experiment, resumed_runs, *overrides), tmp_path)
    run_to_completion(kdlab_command(experiment, clean_runs, *overrides), tmp_path)
    run_dir = only_dir(resumed_runs / experiment)
    assert_resumed(run_dir, killed_at)
    resumed, clean = metrics_of(run_dir), metrics_of(only_dir(clean_runs / experiment))
    assert_same_numbers(resumed, clean)
    scheme_keys = [k for k in clean if k.startswith(("test/peer", "test/exit", "test/int8"))]
    assert all(resumed[k] == clean[k] for k in scheme_keys), scheme_keys
