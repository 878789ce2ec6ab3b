"""``kdlab card``: the student's model card, beside its teacher's, for the device decision.

Accuracy (the runs' own test top-1), parameters, size on disk (``torch.save`` of the weights, as
an app would ship them; and each file ``kdlab export`` wrote), batch-1 CPU latency (median of
many calls, same threads for both), peak memory of batch-1 inference (see
:mod:`kdlab.deploy.latency`) and the speed-up over the teacher. Written as ``card.md``,
``card.json`` and ``card.png`` in the run folder and as ``card/*`` keys in its ``metrics.json``,
so ``kdlab table`` can show them as columns.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.deploy.export import EXPORT_DIR, read_exports
from kdlab.deploy.finished import FinishedStudent, load_finished_student
from kdlab.deploy.latency import (
    eager_runner,
    file_peak_memory_mb,
    median_latency_ms,
    peak_memory_mb,
    torch_threads,
)
from kdlab.errors import ConfigError
from kdlab.files import atomic_write_json, atomic_write_text
from kdlab.markdown import markdown_table
from kdlab.models import count_parameters
from kdlab.plots import table_figure
from kdlab.quantization import model_size_bytes
from kdlab.teachers.stored import load_teacher_model, read_teacher_run

CARD_PREFIX = "card/"
EXPORT_HEADER = (
    "file",
    "size",
    "top-1, test (%)",
    "top-1 agreement with PyTorch, test (%)",
    "batch-1 latency (ms)",
    "peak memory (MiB)",
)


@dataclass
class ModelCost:
    """One model's accuracy and what it costs to run."""

    label: str
    top1: float | None
    params: int
    size_bytes: int
    latency_ms: float
    peak_memory_mb: float | None


@dataclass
class ExportCost:
    """One file ``kdlab export`` wrote, with its parity record and what it costs to run."""

    file: str
    size_bytes: int
    top1: float  # on the test split, like the card's other top-1 numbers
    agreement: float
    latency_ms: float
    peak_memory_mb: float | None


@dataclass
class Card:
    run_dir: Path
    student: ModelCost
    teachers: list[ModelCost]
    exports: list[ExportCost] = field(default_factory=list)
    threads: int = 1
    runs: int = 200
    machine: str = ""

    @property
    def teacher(self) -> ModelCost | None:
        """The teachers as one model: summed costs, mean accuracy (an ensemble runs every member)."""
        if not self.teachers:
            return None
        if len(self.teachers) == 1:
            return self.teachers[0]
        tops = [t.top1 for t in self.teachers if t.top1 is not None]
        memories = [t.peak_memory_mb for t in self.teachers if t.peak_memory_mb is not None]
        return ModelCost(
            f"{len(self.teachers)} teachers (top-1: their mean)",
            sum(tops) / len(tops) if tops else None,
            sum(t.params for t in self.teachers),
            sum(t.size_bytes for t in self.teachers),
            sum(t.latency_ms for t in self.teachers),
            sum(memories) if len(memories) == len(self.teachers) else None,
        )

    def metrics(self) -> dict[str, Any]:
        """The ``card/*`` keys added to the run's metrics.json."""
        student, teacher = self.student, self.teacher
        values: dict[str, Any] = {
            "params": student.params,
            "size_bytes": student.size_bytes,
            "latency_ms": student.latency_ms,
            "peak_memory_mb": student.peak_memory_mb,
            "threads": self.threads,
        }
        if teacher is not None:
            values.update(
                teacher_top1=teacher.top1,
                teacher_params=teacher.params,
                teacher_size_bytes=teacher.size_bytes,
                teacher_latency_ms=teacher.latency_ms,
                teacher_peak_memory_mb=teacher.peak_memory_mb,
                speedup=teacher.latency_ms / student.latency_ms,
            )
            if teacher.top1 is not None and student.top1 is not None:
                values["top1_gap"] = student.top1 - teacher.top1
        for export in self.exports:
            values[f"{export.file}/latency_ms"] = export.latency_ms
            values[f"{export.file}/size_bytes"] = export.size_bytes
            values[f"{export.file}/peak_memory_mb"] = export.peak_memory_mb
        return {CARD_PREFIX + key: value for key, value in values.items()}


def _mb(size: int) -> str:
    return f"{size / 1e6:.3f} MB" if size < 10e6 else f"{size / 1e6:.1f} MB"


def _params(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e5 else f"{count / 1e3:.1f} K"


def _top1(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _memory(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def card_rows(card: Card) -> tuple[list[str], list[list[str]]]:
    """The card's main table: student, teacher and their ratio, one row per quantity."""
    student, teacher = card.student, card.teacher
    header = ["", f"student: {student.label}"]
    if teacher is not None:
        header += [f"teacher: {teacher.label}", "student vs teacher"]

    def row(name: str, text: Any, s: Any, t: Any, compare: str) -> list[str]:
        return [name, text(s), *([text(t), compare] if teacher is not None else [])]

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else ""

    gap = (
        f"{student.top1 - teacher.top1:+.2f} points"
        if teacher is not None and student.top1 is not None and teacher.top1 is not None
        else ""
    )
    t = teacher or student
    rows = [
        row("Top-1, test (%)", _top1, student.top1, t.top1, gap),
        row("Parameters", _params, student.params, t.params, ratio(student.params, t.params)),
        row(
            "Size on disk (weights, torch.save)",
            _mb,
            student.size_bytes,
            t.size_bytes,
            ratio(student.size_bytes, t.size_bytes),
        ),
        row(
            f"Batch-1 CPU latency, median of {card.runs} (ms)",
            lambda v: f"{v:.3f}",
            student.latency_ms,
            t.latency_ms,
            f"{t.latency_ms / student.latency_ms:.2f}x speed-up" if teacher is not None else "",
        ),
        row(
            "Peak memory, batch-1 inference (MiB)",
            _memory,
            student.peak_memory_mb,
            t.peak_memory_mb,
            ratio(student.peak_memory_mb, t.peak_memory_mb),
        ),
    ]
    return header, rows


def render_markdown(card: Card, title: str) -> str:
    lines = [f"# {title}", "", *markdown_table(*card_rows(card))]
    if card.exports:
        lines += ["", "## Exported files (`kdlab export`), run with onnxruntime / torch.jit", ""]
        lines += markdown_table(
            EXPORT_HEADER,
            [
                (
                    e.file,
                    _mb(e.size_bytes),
                    f"{e.top1:.2f}",
                    f"{e.agreement:.2f}",
                    f"{e.latency_ms:.3f}",
                    _memory(e.peak_memory_mb),
                )
                for e in card.exports
            ],
        )
    lines += ["", card.machine, ""]
    return "\n".join(lines)


def machine_line(threads: int, runs: int, warmup: int) -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"Measured on {cpu}, {os.cpu_count()} cores, {threads} thread(s), median of {runs} batch-1 calls after"
        f" {warmup} warm-up calls; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}."
    )


def _cost(
    label: str,
    top1: float | None,
    params: int,
    model: nn.Module,
    example: torch.Tensor,
    runs: int,
    warmup: int,
    threads: int,
) -> ModelCost:
    return ModelCost(
        label,
        top1,
        params,
        model_size_bytes(model),
        median_latency_ms(eager_runner(model), example, runs, warmup),
        peak_memory_mb(model, example, threads),
    )


def _teacher_costs(student: FinishedStudent, runs: int, warmup: int, threads: int) -> list[ModelCost]:
    from kdlab.planning import is_paired

    datamodule = student.datamodule
    shape = datamodule.teacher_input_shape if is_paired(datamodule) else datamodule.input_shape  # type: ignore[attr-defined]
    costs = []
    for run_dir in student.teacher_run_dirs():
        if not run_dir.exists():
            raise ConfigError(f"the teacher run {run_dir} of student run {student.run_dir} is gone; its card needs it")
        spec = read_teacher_run(run_dir)
        model = load_teacher_model(run_dir, spec, datamodule.num_classes).eval()
        top1 = json.loads((run_dir / "metrics.json").read_text()).get("test/top1")
        example = torch.zeros(1, *shape)
        params = count_parameters(model)
        costs.append(_cost(spec["model"]["name"], top1, params, model, example, runs, warmup, threads))
    return costs


def _export_costs(student: FinishedStudent, runs: int, warmup: int, threads: int) -> list[ExportCost]:
    from kdlab.deploy.formats import EXPORT_FORMATS

    costs = []
    example = student.example_input()
    for name, entry in sorted(read_exports(student.run_dir).items()):
        path = student.run_dir / EXPORT_DIR / name
        if not path.exists():
            continue
        runner = EXPORT_FORMATS.get(entry["format"])().load(path, threads)
        memory = file_peak_memory_mb(entry["format"], path, example, threads)  # formats are probe kinds
        latency = median_latency_ms(runner, example, runs, warmup)
        costs.append(
            ExportCost(
                name, path.stat().st_size, entry["test"]["exported_top1"], entry["test"]["agreement"], latency, memory
            )
        )
    return costs


def build_card(
    run_dir: str | Path, data_root: str | None = None, runs: int = 200, warmup: int = 20, threads: int = 1
) -> Card:
    """Measure the student, its teachers and its exported files."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise ConfigError(f"--runs and --threads must be >= 1 and --warmup >= 0, got {runs}, {threads}, {warmup}")
    student = load_finished_student(run_dir, data_root)
    with torch_threads(threads):
        label = student.name + (f" (int8, {student.quantized['bits']}-bit weights)" if student.quantized else "")
        own = _cost(
            label,
            student.top1,
            student.params,
            student.model,
            student.example_input(),
            runs,
            warmup,
            threads,
        )
        teachers = _teacher_costs(student, runs, warmup, threads)
        exports = _export_costs(student, runs, warmup, threads)
    return Card(student.run_dir, own, teachers, exports, threads, runs, machine_line(threads, runs, warmup))


def write_card(card: Card) -> dict[str, Any]:
    """card.md, card.json, card.png, and the ``card/*`` metrics merged into metrics.json."""
    run_dir = card.run_dir
    title = f"Model card: {run_dir.parent.name}/{run_dir.name}"
    atomic_write_text(run_dir / "card.md", render_markdown(card, title))
    header, rows = card_rows(card)
    table_figure(header, rows, run_dir / "card.png", title=title, footer=card.machine)
    metrics = card.metrics()
    atomic_write_json(run_dir / "card.json", {"machine": card.machine, **metrics})
    previous = json.loads((run_dir / "metrics.json").read_text())
    merged = {k: v for k, v in previous.items() if not k.startswith(CARD_PREFIX)} | metrics
    atomic_write_json(run_dir / "metrics.json", merged)
    return metrics
