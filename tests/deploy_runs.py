"""Finished student runs for the export and model-card tests, trained here by kdlab itself.

MNIST-1D: the KD experiment's MLP student with its CNN teacher (a few epochs). resnet8x4: the
CIFAR-100 CRD pair's student, trained by cross-entropy alone (no resnet32x4 teacher: minutes on
2 cores) for one epoch on CIFAR-100 files written in the real python-pickle format, whose images
are made from per-class templates so that it learns them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakedata import accept_written_cifar, write_cifar100
from torchvision.datasets import CIFAR100

from kdlab.catalog import load_experiment
from kdlab.pipeline import Outcome, run_experiment

QUIET = ["runtime.wandb=disabled", "runtime.progress=false"]


def mnist1d_kd_run(runs: Path, *overrides: str) -> Outcome:
    config = [f"runtime.runs_dir={runs}", "teacher.train.epochs=4", "student.train.epochs=4", *QUIET, *overrides]
    return run_experiment(load_experiment("mnist1d-kd", config))


def resnet8x4_overrides(runs: Path, root: Path) -> list[str]:
    return [
        f"runtime.runs_dir={runs}",
        f"data.root={root}",
        "method.name=ce",
        "student.train.epochs=1",
        "student.train.test_every_epoch=false",
        "data.batch_size=32",
        "data.eval_batch_size=100",
        "data.num_workers=0",
        *QUIET,
    ]


def write_fake_cifar100(root: Path) -> None:
    """20 learnable classes: the trained student predicts many classes, so top-1 agreement with
    an exported file means something (a model that predicts one class agrees with anything alike)."""
    write_cifar100(root, n_train=640, n_test=200, learnable_classes=20)


def resnet8x4_run(runs: Path, root: Path) -> Outcome:
    """The resnet8x4 student on written CIFAR-100 files (torchvision's md5 table accepts them)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        accept_written_cifar(monkeypatch, CIFAR100, root)
        return run_experiment(load_experiment("crd-resnet32x4-resnet8x4", resnet8x4_overrides(runs, root)))
