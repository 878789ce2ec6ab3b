"""``train.test_every_epoch``: the best-epoch test top-1 of the CRD/DKD protocol, read from the
per-epoch log, without changing what trains."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.config import spec_dict
from kdlab.pipeline import run_experiment

FAST = ["student.train.epochs=4", "runtime.wandb=disabled", "runtime.progress=false", "runtime.threads=1"]


def _run(runs: Path, *overrides: str) -> tuple[dict, Path]:
    outcome = run_experiment(load_experiment("mnist1d-ce", [f"runtime.runs_dir={runs}", *FAST, *overrides]))
    return outcome.student, outcome.student_run.dir


def _epoch_top1(run_dir: Path) -> list[float]:
    with (run_dir / "logs" / "attempt-1" / "metrics.csv").open() as handle:
        return [float(row["test_epoch/top1"]) for row in csv.DictReader(handle) if row.get("test_epoch/top1")]


def test_best_epoch_is_the_maximum_of_the_per_epoch_test_scores_and_training_is_unchanged(tmp_path: Path) -> None:
    plain, plain_dir = _run(tmp_path / "plain")
    best, best_dir = _run(tmp_path / "best", "student.train.test_every_epoch=true")
    per_epoch = _epoch_top1(best_dir)
    assert len(per_epoch) == 4
    assert best["test/top1_best"] == pytest.approx(max(per_epoch), abs=1e-4)  # the log holds float32
    assert best["test/top1_best_epoch"] == per_epoch.index(max(per_epoch))
    assert per_epoch[-1] == pytest.approx(best["test/top1"], abs=1e-4)  # the last epoch's is test/top1
    # Same weights: the extra test pass drew no random numbers from the training streams.
    a = torch.load(plain_dir / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(best_dir / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert plain["test/top1"] == best["test/top1"] and "test/top1_best" not in plain


def test_the_option_stays_out_of_run_specs_at_its_default() -> None:
    spec = spec_dict(load_experiment("mnist1d-ce"))
    assert "test_every_epoch" not in str(spec)
    assert "test_every_epoch" in str(spec_dict(load_experiment("mnist1d-ce", ["student.train.test_every_epoch=true"])))
