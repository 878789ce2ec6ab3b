"""``kdlab export``: a finished run's student as a deployable file, checked against PyTorch.

Files go to ``<run>/export/`` (``student.onnx``, ``student.int8-static.onnx``, ...). Each is
written to a temporary name, run over the validation split (the test split where the run held
none out) beside the PyTorch student, and renamed into place only if a float file agrees with
PyTorch on at least ``min_agreement`` % of the samples' top-1. An int8 file is kept whatever
its agreement: its accuracy drop is the number the user wants, reported on the validation and
the (larger, untouched by training) test split. ``export/report.json`` records every file's size
and parity.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from kdlab.deploy.finished import FinishedStudent, load_finished_student
from kdlab.deploy.formats import EXPORT_FORMATS, INT8_MODES, ExportError, ExportFormat
from kdlab.deploy.parity import Parity, check_parity
from kdlab.errors import ConfigError, unknown
from kdlab.files import atomic_write_json

EXPORT_DIR = "export"
REPORT = "report.json"
MIN_AGREEMENT = 99.5  # % top-1 agreement a float export must reach (the acceptance bar)


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    format: str
    precision: str  # "fp32", "int8-dynamic" or "int8-static"
    size_bytes: int
    split: str
    parity: Parity
    test: Parity  # the test split too (the same as ``parity`` when the run held nothing out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "format": self.format,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "split": self.split,
            **self.parity.as_dict(),
            "test": self.test.as_dict(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def parity_split(student: FinishedStudent) -> tuple[str, DataLoader]:
    """The split a parity check runs on: validation if the run held one out, else test."""
    if student.datamodule.has_validation:
        return "val", student.datamodule.val_dataloader()
    return "test", student.datamodule.test_dataloader()


def calibration_batches(student: FinishedStudent, samples: int) -> list[torch.Tensor]:
    """The first ``samples`` training inputs, unaugmented and in index order (reproducible ranges)."""
    batches, count = [], 0
    for batch in student.datamodule.ordered_train_dataloader():
        batches.append(batch["input"][: samples - count])
        count += len(batches[-1])
        if count >= samples:
            break
    return batches


def check_options(format_name: str, int8: str | None, min_agreement: float, calibration_samples: int) -> ExportFormat:
    """Every option, before any model is loaded or written."""
    export_format = EXPORT_FORMATS.get(format_name)()
    if int8 is not None and int8 not in INT8_MODES:
        raise unknown("int8 mode", int8, INT8_MODES)
    if not 0 <= min_agreement <= 100:
        raise ConfigError(f"--min-agreement is a percentage in [0, 100], got {min_agreement}")
    if calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be at least 1, got {calibration_samples}")
    return export_format


def _write_checked(
    student: FinishedStudent,
    export_format: ExportFormat,
    path: Path,
    precision: str,
    write: Callable[[Path], None],
    min_agreement: float | None,
) -> ExportedFile:
    """``write(tmp)`` then parity; renamed into place if it passes (``None``: always kept)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        split, loader = parity_split(student)
        runner = export_format.load(temporary)
        parity = check_parity(student.model, runner, loader)
        if min_agreement is not None and parity.agreement < min_agreement:
            raise ExportError(
                f"{path.name} disagrees with the PyTorch student of run {student.run_dir}: top-1 agreement"
                f" {parity.agreement:.2f}% < {min_agreement}% on {parity.samples} {split} samples (largest logit"
                f" difference {parity.max_abs_diff:.3g}); nothing was written"
            )
        test = parity if split == "test" else check_parity(student.model, runner, student.datamodule.test_dataloader())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportedFile(path, export_format.name, precision, path.stat().st_size, split, parity, test)


def export_run(
    run_dir: str | Path,
    format_name: str,
    int8: str | None = None,
    data_root: str | None = None,
    min_agreement: float = MIN_AGREEMENT,
    calibration_samples: int = 512,
) -> list[ExportedFile]:
    """Write the student of a finished run in ``format_name`` (and int8 with ``int8``), each
    file checked against PyTorch; returns what was written, float first."""
    export_format = check_options(format_name, int8, min_agreement, calibration_samples)
    student = load_finished_student(run_dir, data_root)
    if int8 is not None and student.quantized is not None:
        raise ConfigError(
            f"the student of run {student.run_dir} is already int8 (quantized scheme,"
            f" {student.quantized['bits']} bits): export it without --int8"
        )
    folder = student.run_dir / EXPORT_DIR
    folder.mkdir(exist_ok=True)
    float_path = folder / f"student{export_format.suffix}"
    example = student.example_input(batch=2)
    model = student.model

    def write_float(path: Path) -> None:
        export_format.export(model, example, path)

    precision = "int8-qat" if student.quantized is not None else "fp32"
    try:
        written = [_write_checked(student, export_format, float_path, precision, write_float, min_agreement)]
        if int8 is not None:
            batches = calibration_batches(student, calibration_samples)
            int8_path = folder / f"student.int8-{int8}{export_format.suffix}"

            def write_int8(path: Path) -> None:
                export_format.export_int8(model, float_path, path, int8, batches)

            written.append(_write_checked(student, export_format, int8_path, f"int8-{int8}", write_int8, None))
    except ExportError as error:
        raise ExportError(f"run {student.run_dir}: {error}") from None
    record_exports(folder, written)
    return written


def record_exports(folder: Path, written: list[ExportedFile]) -> None:
    """Merge these files' entries into ``export/report.json`` (atomically; other files' stay)."""
    report_path = folder / REPORT
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update({item.path.name: item.as_dict() for item in written})
    atomic_write_json(report_path, report)


def read_exports(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What ``kdlab export`` recorded for a run (empty if nothing was exported)."""
    report_path = run_dir / EXPORT_DIR / REPORT
    return json.loads(report_path.read_text()) if report_path.exists() else {}
