"""``kdlab teacher-report RUN...``: what to look at before distilling from these teachers.

For each finished teacher run: test accuracy, NLL, ECE, MCE and Brier score before and after its
fitted calibration; for the set: how often each pair of teachers predicts the same class (teachers
that always agree add little as an ensemble) and the accuracy of their averaged probabilities.
Written as markdown, a table PNG and an agreement heat-map PNG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kdlab.config import DataConfig
from kdlab.data import create_datamodule
from kdlab.errors import ConfigError
from kdlab.files import atomic_write_text
from kdlab.markdown import markdown_table
from kdlab.metrics import evaluate_logits
from kdlab.models import count_parameters
from kdlab.plots import agreement_heatmap, table_figure
from kdlab.teachers.calibration import collect_logits
from kdlab.teachers.stored import load_teacher_model, read_teacher_run

METRICS = ("top1", "nll", "ece", "mce", "brier")


@dataclass
class TeacherResult:
    run: Path
    name: str
    params: int
    calibration: str
    before: dict[str, float]
    after: dict[str, float] | None
    logits: torch.Tensor


def _evaluate(run: Path, spec: dict[str, Any], data_root: str | None) -> tuple[TeacherResult, torch.Tensor]:
    datamodule = create_datamodule(DataConfig(**{**spec["data"], "root": data_root}), spec["seed"])
    model = load_teacher_model(run, spec, datamodule.num_classes)
    key = datamodule.teacher_input_key
    logits, targets = collect_logits(model, datamodule.test_dataloader(), "cpu", key)
    calibration = run / "calibration.json"
    report = json.loads(calibration.read_text()) if calibration.exists() else {}
    result = TeacherResult(
        run=run,
        name=" ".join(filter(None, [spec["model"]["name"], _kwargs(spec["model"]["kwargs"]), f"seed {spec['seed']}"])),
        params=count_parameters(model),
        calibration=report.get("method", "none"),
        before=evaluate_logits(logits, targets),
        after=report.get("after") if report.get("method", "none") != "none" else None,
        logits=logits,
    )
    return result, targets


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def agreement(logits: list[torch.Tensor]) -> torch.Tensor:
    """``[K, K]``: the fraction of test samples on which teachers ``i`` and ``j`` predict the same class."""
    predictions = torch.stack([z.argmax(-1) for z in logits])
    return (predictions[:, None, :] == predictions[None, :, :]).double().mean(-1)


def teacher_report(
    runs: list[Path], out_dir: Path, data_root: str | None = None, console: Console | None = None
) -> list[Path]:
    """Evaluate the teacher runs on their (shared) test split and write the report."""
    console = console or Console()
    specs = [read_teacher_run(run) for run in runs]
    data = {json.dumps(spec["data"], sort_keys=True) for spec in specs}
    if len(data) > 1:
        raise ConfigError(f"the teacher runs were trained on different data; report them separately: {runs}")
    results, targets = [], None
    for run, spec in zip(runs, specs, strict=True):
        result, targets = _evaluate(run, spec, data_root)
        results.append(result)
    assert targets is not None
    header = [
        "Teacher",
        "Params",
        "Calibration",
        *(f"{m}" for m in METRICS),
        *(f"{m}, calibrated" for m in METRICS[2:]),
    ]
    rows = []
    for r in results:
        after = [f"{r.after[m]:.3f}" if r.after and m in r.after else "—" for m in METRICS[2:]]
        rows.append([r.name, f"{r.params / 1e3:.1f}K", r.calibration, *(f"{r.before[m]:.3f}" for m in METRICS), *after])
    if len(results) > 1:
        mean_probs = torch.stack([r.logits.softmax(-1) for r in results]).mean(0)
        ensemble = evaluate_logits(mean_probs.clamp_min(1e-12).log(), targets)
        rows.append(
            [f"ensemble of {len(results)} (mean probabilities)", "", "", *(f"{ensemble[m]:.3f}" for m in METRICS)]
        )
        rows[-1] += ["—"] * (len(header) - len(rows[-1]))
    table = Table(title="Teachers on the test split", title_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "Teacher" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)

    matrix = agreement([r.logits for r in results])
    labels = [f"T{i}" for i in range(len(results))]
    lines = ["# Teacher report", "", *markdown_table(header, rows)]
    lines += ["", "Top-1 agreement on the test split (fraction of samples with the same prediction):", ""]
    agreement_rows = [[a, *(f"{v:.3f}" for v in matrix[i].tolist())] for i, a in enumerate(labels)]
    lines += markdown_table(["", *labels], agreement_rows)
    lines += ["", *(f"- {label}: {r.name}, {r.run}" for label, r in zip(labels, results, strict=True)), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "teacher-report.md", out_dir / "teacher-report.png", out_dir / "teacher-agreement.png"]
    atomic_write_text(files[0], "\n".join(lines))
    table_figure(header, rows, files[1], title="Teachers on the test split")
    agreement_heatmap(matrix, labels, files[2])
    console.print("wrote " + ", ".join(str(f) for f in files))
    return files
