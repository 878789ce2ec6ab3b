"""Offline distillation: a frozen teacher (or none, for the CE baseline) teaches one student."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config import TrainConfig
from kdlab.data.base import Batch
from kdlab.features import FeatureTaps, tapped_forward
from kdlab.methods.base import Method
from kdlab.metrics import ClassificationMetrics
from kdlab.optim import build_optimizer, build_scheduler
from kdlab.schemes.loss_log import LossLog
from kdlab.schemes.registry import register_scheme
from kdlab.schemes.teacher import FrozenTeacher

TEACHER_PREFIX = "teacher."


@register_scheme("offline", "frozen teacher -> student (Hinton-style); with method=ce, plain supervised training")
class OfflineDistillation(L.LightningModule):
    """The system: student + method (+ frozen teacher). Loss = sum of weighted named terms.

    ``stage="init"`` runs the method's initialisation stage instead: its own loss terms (weight 1
    each) and only the parameters it names are optimised.
    """

    def __init__(
        self,
        student: nn.Module,
        method: Method,
        weights: Mapping[str, float],
        train: TrainConfig,
        num_classes: int,
        teacher: FrozenTeacher | None = None,
        calibration_bins: int = 15,
        stage: str = "main",
    ) -> None:
        super().__init__()
        if stage not in ("init", "main"):
            raise ValueError(f"stage must be 'init' or 'main', got {stage!r}")
        self.stage = method.stage = stage
        self.student = student
        self.method = method
        self.teacher = teacher
        self.weights = dict(weights)
        self.train_config = train
        self.student_taps = FeatureTaps(student, method.student_taps, role="student")
        self.loss_log = LossLog()
        self.val_metrics = ClassificationMetrics(num_classes, calibration_bins)
        self.test_metrics = ClassificationMetrics(num_classes, calibration_bins)
        # The teacher is saved in its own run, not in every student checkpoint.
        self.register_state_dict_post_hook(_drop_teacher_state)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_state)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.student(inputs)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every named loss term of one batch, unweighted (the method never sees the weights)."""
        student = tapped_forward(self.student, self.student_taps, batch["input"])
        teacher = self.teacher(batch["input"]) if self.teacher is not None else None
        if self.stage == "init":
            return self.method.init_loss(student, teacher, batch)
        terms: dict[str, torch.Tensor] = {}
        if self.weights.get("ce", 0.0):
            terms["ce"] = F.cross_entropy(
                student.logits, batch["target"], label_smoothing=self.train_config.label_smoothing
            )
        terms.update(self.method(student, teacher, batch))
        return terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        loss = sum(self.term_weight(name) * term for name, term in terms.items())
        self.loss_log.add(self, {**terms, "loss": loss}, batch["target"].shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        self.method.epoch = self.current_epoch

    def term_weight(self, name: str) -> float:
        return 1.0 if self.stage == "init" else self.weights[name]

    def on_train_epoch_end(self) -> None:
        self.loss_log.log_epoch(self)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.val_metrics.update(self.student(batch["input"]), batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.test_metrics.update(self.student(batch["input"]), batch["target"])

    def on_test_epoch_end(self) -> None:
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.compute().items()})
        self.test_metrics.reset()

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What this stage optimises; the teacher's parameters never reach the optimiser."""
        if self.stage == "init":
            yield from self.method.init_parameters(self.student)
            return
        yield from self.student.parameters()
        yield from self.method.trainable_parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.trainable_parameters(), self.train_config.optimizer)
        scheduler = build_scheduler(optimizer, self.train_config.schedule, self.train_config.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _drop_teacher_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + TEACHER_PREFIX)]:
        del state_dict[key]


def _ignore_missing_teacher_state(module: nn.Module, incompatible: Any) -> None:
    kept = [k for k in incompatible.missing_keys if not k.startswith(TEACHER_PREFIX)]
    incompatible.missing_keys[:] = kept
