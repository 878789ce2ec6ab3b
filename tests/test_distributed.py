"""Several processes (2 gloo ranks on CPU): the same numbers as one process, one writer, shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kdlab.catalog import load_experiment
from kdlab.data.base import EpochShuffle
from kdlab.errors import ConfigError
from kdlab.pipeline import plan_experiment

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
