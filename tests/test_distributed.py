"""Several processes (2 gloo ranks on CPU): the same numbers as one process, one writer, shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_resume import assert_same_numbers, kill_after_epoch

from kdlab.catalog import load_experiment
from kdlab.data.base import EpochShuffle
from kdlab.errors import ConfigError
from kdlab.metrics import evaluate_logits
from kdlab.modelio import MODEL_FILE_FORMAT, load_model_weights
from kdlab.models.registry import create_model
from kdlab.pipeline import plan_experiment
from kdlab.teachers.calibration import collect_logits

KDLAB = str(Path(sys.executable).parent / "kdlab")
QUIET = ["runtime.wandb=disabled", "runtime.progress=false", "runtime.threads=1", "runtime.accelerator=cpu"]


def kdlab_run(runs: Path, *overrides: str, env: dict[str, str] | None = None) -> str:
    command = [KDLAB, "run", *overrides, f"runtime.runs_dir={runs}", *QUIET]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def metrics_of(runs: Path, group: str) -> dict[str, Any]:
    (path,) = runs.glob(f"{group}/*/metrics.json")
    return json.loads(path.read_text())


def test_the_ranks_batches_together_are_the_one_process_batch() -> None:
    """Global batch 8 over 2 ranks: rank r's batch k holds positions r::2 of batch k (also with a
    ragged last batch), so gradients averaged over ranks are the one-process gradient."""
    size, batch, world = 21, 8, 2
    single = EpochShuffle(size, seed=3)
    single.set_epoch(5)
    order = list(single)
    shards = []
    for rank in range(world):
        sampler = EpochShuffle(size, seed=3, rank=rank, world=world)
        sampler.set_epoch(5)
        shards.append(list(sampler))
    per_device = batch // world
    for k in range(len(shards[0]) // per_device):
        together = sorted(i for shard in shards for i in shard[k * per_device : (k + 1) * per_device])
        assert together == sorted(order[k * batch : (k + 1) * batch])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.strategy=zero9", "unknown runtime.strategy 'zero9' (valid: auto, ddp"),
        ("data.batch_size=63", "data.batch_size=63 is the global batch and must divide evenly over 2 processes"),
    ],
)
def test_bad_distributed_settings_fail_before_training(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        plan_experiment(load_experiment("mnist1d-ce", [f"runtime.runs_dir={tmp_path}", "runtime.devices=2", override]))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_ddp_on_two_processes_gives_the_one_process_numbers(tmp_path: Path) -> None:
    """Same global batch, no augmentation (it is random per rank): 2 DDP ranks train the same
    student as 1 process, up to float summation order (measured: weights within 2e-7, test
    metrics equal to 1e-5); tolerance: NLL 1e-4 relative, top-1 0.11 points (one test sample)."""
    common = ["mnist1d-ce", "student.train.epochs=3", "data.augment=false"]
    kdlab_run(tmp_path / "one", *common)
    kdlab_run(tmp_path / "two", *common, "runtime.strategy=ddp", "runtime.devices=2")
    one, two = metrics_of(tmp_path / "one", "mnist1d-ce"), metrics_of(tmp_path / "two", "mnist1d-ce")
    for key in ("test/nll", "val/nll"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    for key in ("test/top1", "val/top1"):
        assert two[key] == pytest.approx(one[key], abs=0.11), key
    (run_dir,) = (tmp_path / "two" / "mnist1d-ce").iterdir()
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["attempt-1"], "one writer, one log"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


@pytest.mark.slow
def test_ddp_counts_each_sample_of_an_uneven_split_once(tmp_path: Path) -> None:
    """21 test samples over 2 ranks: the ranks forward as many batches (a repeat pads one), and the
    metrics skip the repeat, so they are the one-process numbers (without the skip: test/nll off by
    6e-3 relative, top-1 2 of 22 instead of 2 of 21). Random data: the numbers, not learning, count."""
    synthetic = ["num_samples=220", "test_samples=21", "classes=10", "shape=[40]"]
    common = ["mnist1d-ce", "data.name=synthetic", *(f"data.kwargs.{kwarg}" for kwarg in synthetic)]
    common += ["data.batch_size=20", "data.eval_batch_size=8", "data.augment=false", "student.train.epochs=1"]
    kdlab_run(tmp_path / "one", *common)
    kdlab_run(tmp_path / "two", *common, "runtime.strategy=ddp", "runtime.devices=2")
    one, two = metrics_of(tmp_path / "one", "mnist1d-ce"), metrics_of(tmp_path / "two", "mnist1d-ce")
    for key in ("test/nll", "test/top1", "test/ece", "val/nll"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def probe(tmp_path: Path, strategy: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Multi-teacher distillation (3 teachers) on 2 ranks; each rank's view after one step."""
    command = [sys.executable, str(Path(__file__).parent / "shard_probe.py"), str(tmp_path), strategy]
    overrides = ["teacher.train.epochs=1", "student.train.epochs=1", "runtime.devices=2", *QUIET]
    done = subprocess.run(
        [*command, *overrides], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]


def assert_halves(local: int, full: int) -> None:
    """A rank's shard of a model over 2 ranks: about half (FSDP2 pads each tensor's dim 0)."""
    assert 0.4 * full <= local <= 0.6 * full, (local, full)


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_teachers_and_the_student(tmp_path: Path) -> None:
    for report in probe(tmp_path, "fsdp2"):
        assert report["world"] == 2 and not report["teacher_in_optimizer"]
        for local, full in zip(report["teachers"], report["teachers_full"], strict=True):
            assert_halves(local, full)
        assert_halves(report["student"], report["student_full"])
        assert report["optimizer"] == report["student"]  # the optimiser steps the student's shard only


DEEPSPEED_CPU = {"DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
def test_zero3_partitions_the_frozen_teachers_and_the_student(tmp_path: Path) -> None:
    """Lightning's DeepSpeedStrategy (its CUDA check lifted on CPU) at ZeRO-3: every parameter,
    the teachers' too, is partitioned over the ranks and gathered module by module."""
    for report in probe(tmp_path, "deepspeed_stage_3", DEEPSPEED_CPU):
        assert not report["teacher_in_optimizer"]
        for local, full in zip(report["teachers"], report["teachers_full"], strict=True):
            assert_halves(local, full)
        assert_halves(report["student"], report["student_full"])
        assert_halves(report["optimizer"], report["student_full"])


@pytest.mark.slow
def test_zero2_partitions_the_optimiser_state(tmp_path: Path) -> None:
    """ZeRO-2 partitions optimiser state and gradients; parameters (teachers' too) stay whole."""
    for report in probe(tmp_path, "deepspeed_stage_2", DEEPSPEED_CPU):
        assert not report["teacher_in_optimizer"]
        assert report["teachers"] == report["teachers_full"] and report["student"] == report["student_full"]
        assert_halves(report["optimizer"], report["student_full"])


def assert_model_file_is_the_student(runs: Path, experiment: str, metrics: dict[str, Any]) -> None:
    """``model.pt`` holds the student alone at full shapes (no shards, no teacher, no scheme
    parts), loads strictly into a fresh model and gives the reported test top-1 on the whole test
    split (1000 samples divide over 2 ranks, so the sharded evaluation counted each one once)."""
    (path,) = runs.glob(f"{experiment}/*/model.pt")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    assert payload["format"] == MODEL_FILE_FORMAT and payload["model"] == metrics["model"]
    fresh = create_model(payload["model"], **payload["kwargs"])
    shapes = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    load_model_weights(fresh, path)  # strict: any missing or extra key fails
    plan = plan_experiment(load_experiment(experiment, [f"runtime.runs_dir={runs}"]))
    logits, targets = collect_logits(fresh, plan.datamodule.test_dataloader())
    assert len(targets) == 1000
    assert evaluate_logits(logits, targets)["top1"] == pytest.approx(metrics["test/top1"], abs=1e-4)


def zero(stage: int) -> list[str]:
    """Distillation on 2 CPU ranks under ZeRO-``stage`` (DS_ACCELERATOR=cpu in the environment)."""
    epochs = ["teacher.train.epochs=2", "student.train.epochs=3"]
    return ["mnist1d-kd", "runtime.devices=2", f"runtime.strategy=deepspeed_stage_{stage}", *epochs]


@pytest.mark.slow
def test_deepspeed_kdlab_run_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kdlab run`` under ZeRO-2 (teacher and student) and ZeRO-3 (student) on 2 CPU ranks: one
    report, the student's full model file, the same numbers at both stages (measured: equal to
    each other and to DDP's to the last bit; tolerance as for DDP); then a ZeRO-3 student
    SIGKILLed after an epoch resumes from its shard folder and ends with exactly the
    uninterrupted numbers. The later runs reuse the first one's teacher (runtime is not in the
    run hash), which keeps the test near 2 minutes."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the killed run too
    zero2, zero3, killed = tmp_path / "zero2", tmp_path / "zero3", tmp_path / "killed"
    out = kdlab_run(zero2, *zero(2))
    assert sum(line.startswith("student ") for line in out.splitlines()) == 1, "rank 0 alone reports"
    for runs in (zero3, killed):
        shutil.copytree(zero2 / "teachers", runs / "teachers")
    kdlab_run(zero3, *zero(3))
    metrics = {runs: metrics_of(runs, "mnist1d-kd") for runs in (zero2, zero3)}
    for runs, run_metrics in metrics.items():
        assert run_metrics["attempts"] == 1 and run_metrics["epochs"] == 3
        assert_model_file_is_the_student(runs, "mnist1d-kd", run_metrics)
    for key in ("test/nll", "val/nll"):
        assert metrics[zero3][key] == pytest.approx(metrics[zero2][key], rel=1e-4), key
    for key in ("test/top1", "val/top1"):
        assert metrics[zero3][key] == pytest.approx(metrics[zero2][key], abs=0.11), key

    command = [KDLAB, "run", *zero(3), f"runtime.runs_dir={killed}", *QUIET]
    killed_at = kill_after_epoch(command, tmp_path, "killed/mnist1d-kd/*/checkpoints/last.ckpt/meta.pt", 0, 3)
    (shards,) = killed.glob("mnist1d-kd/*/checkpoints/last.ckpt")
    assert shards.is_dir() and not (shards.parent.parent / "metrics.json").exists()
    kdlab_run(killed, *zero(3))
    resumed = metrics_of(killed, "mnist1d-kd")
    assert resumed["attempts"] == 2 and resumed["resumed_from_epoch"] == killed_at
    assert_same_numbers(resumed, metrics[zero3])
