"""A finished student run as deployment sees it: the student alone, its data, its teacher runs.

``model.pt`` already holds the student without any scheme part (adapters, exit heads, peers,
discriminators are never saved in it), so deployment rebuilds the architecture named in the run's
config and loads that file. A run that has not finished, a teacher run or a language-model run
is refused with a line that names the run and says what to do instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config import DataConfig
from kdlab.data import ClassificationDataModule, create_datamodule
from kdlab.errors import ConfigError, KdlabError
from kdlab.modelio import load_payload_weights
from kdlab.models import count_parameters, create_model
from kdlab.runs import TEACHER_GROUP, check_checkpoint, read_run_spec


class NotFinishedError(KdlabError):
    """The run has no trained student yet (still running, failed, or never started)."""


@dataclass
class FinishedStudent:
    """Everything deployment needs of one finished student run."""

    run_dir: Path
    spec: dict[str, Any]
    metrics: dict[str, Any]
    model: nn.Module  # eval mode, CPU; int8 for a quantized-scheme run
    datamodule: ClassificationDataModule
    quantized: dict[str, Any] | None  # the quantized scheme's bits, when the student is int8
    params: int  # of the architecture (an int8 model keeps its weights in packed buffers instead)

    @property
    def top1(self) -> float | None:
        """The deployed model's test top-1: the int8 model's for a quantized-scheme run."""
        return self.metrics.get("test/int8/top1" if self.quantized else "test/top1")

    @property
    def name(self) -> str:
        return self.spec["student"]["model"]["name"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.datamodule.input_shape)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)

    def teacher_run_dirs(self) -> list[Path]:
        """The finished teacher runs this student learned from (none for CE, DML, BYOT)."""
        teachers = self.spec.get("teachers") or ([self.spec["teacher"]] if "teacher" in self.spec else [])
        hashes = [h for entry in teachers for h in entry.get("ensemble", [entry.get("run")]) if h]
        return [self.run_dir.parent.parent / TEACHER_GROUP / h for h in hashes]


def check_student_run(run_dir: Path, spec: dict[str, Any]) -> None:
    """Refuse what is not a finished image/signal student run, naming the run and the way out."""
    stage = spec.get("stage")
    if stage == "lm-student":
        raise ConfigError(
            f"{run_dir} is a language-model run: its student is saved for from_pretrained in {run_dir / 'hf'};"
            " kdlab export and card take classifier student runs"
        )
    if stage != "student":
        raise ConfigError(f"{run_dir} is a {stage} run, not a student run (runs/<experiment>/<hash>)")
    if not (run_dir / "metrics.json").exists() or not (run_dir / "model.pt").exists():
        status_path = run_dir / "status.json"
        state = json.loads(status_path.read_text()).get("state", "new") if status_path.exists() else "new"
        raise NotFinishedError(
            f"run {run_dir} has not finished (state: {state}): it has no trained student to deploy yet;"
            " finish it with `kdlab run` first (an unfinished run resumes from its last checkpoint)"
        )


def run_datamodule(spec: dict[str, Any], data_root: str | None) -> ClassificationDataModule:
    """The run's dataset (``data.root`` is never part of a run, so it comes from the caller)."""
    data = DataConfig(**{**spec["data"], "root": data_root, "augment": False})
    datamodule = create_datamodule(data, spec["seed"])
    datamodule.setup()
    return datamodule


def build_student(spec: dict[str, Any], num_classes: int) -> nn.Module:
    model = spec["student"]["model"]
    return create_model(model["name"], **{"num_classes": num_classes, **model["kwargs"]})


def load_int8_student(
    model: nn.Module, options: dict[str, Any], state: dict[str, Any], example: torch.Tensor
) -> nn.Module:
    """Rebuild a quantized-scheme student: the same fake-quant graph (one forward gives every
    quantizer a range, so it converts), converted with the saved int8 state loaded over it."""
    from kdlab.quantization import convert_to_int8, prepare_fake_quant

    fake_quant = prepare_fake_quant(model, options["bits"], example, options.get("activation_bits"))
    with torch.no_grad():
        fake_quant(example)
    return convert_to_int8(fake_quant, state)


def load_finished_student(run_dir: str | Path, data_root: str | None = None) -> FinishedStudent:
    """A finished student run's model (eval, CPU), data and metrics; refused if unfinished."""
    run_dir = Path(run_dir).resolve()
    spec = read_run_spec(run_dir)
    check_student_run(run_dir, spec)
    datamodule = run_datamodule(spec, data_root)
    model = build_student(spec, datamodule.num_classes)
    params = count_parameters(model)
    payload = check_checkpoint(run_dir / "model.pt")
    quantized = payload.get("quantized")
    if quantized is None:
        load_payload_weights(model, payload, run_dir / "model.pt")
    else:
        model = load_int8_student(model, quantized, payload["state_dict"], torch.zeros(2, *datamodule.input_shape))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return FinishedStudent(run_dir, spec, metrics, model.eval(), datamodule, quantized, params)
