"""What every scheme shares: the student, the method, frozen teachers, evaluation and optimisation.

A scheme subclasses :class:`DistillationScheme` and implements :meth:`loss_terms` (one batch in,
named unweighted terms out); the base sums ``weight[name] * term``, logs the terms cheaply,
evaluates the student (and any extra exits or peers the scheme names in :meth:`eval_logits`),
and optimises the student, the method's parts and whatever the scheme owns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config import TrainConfig
from kdlab.data.base import Batch, DataInfo, counted_rows
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.methods.base import Method
from kdlab.metrics import ClassificationMetrics
from kdlab.mixing import BatchMixer, check_mixing
from kdlab.optim import build_optimizer, build_scheduler
from kdlab.sam import check_sam
from kdlab.schemes.ensemble import TeacherEnsemble
from kdlab.schemes.loss_log import LossLog
from kdlab.schemes.teacher import FrozenTeacher

TEACHERS_PREFIX = "teachers."


@contextmanager
def probing(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a forward that only finds shapes (the example batch), so
    building a scheme never moves a model's BatchNorm statistics; modes are restored after."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


@dataclass(frozen=True)
class NoOptions:
    """A scheme without options of its own."""


@dataclass
class SystemParts:
    """Everything the pipeline hands a scheme, built and validated by the plan."""

    student: nn.Module
    method: Method
    weights: dict[str, float]
    train: TrainConfig
    num_classes: int
    teachers: list[FrozenTeacher] = field(default_factory=list)
    options: Any = field(default_factory=NoOptions)
    stage: str = "main"
    calibration_bins: int = 15
    # Batch keys of what the student and the teachers see (paired data: "input" / "teacher_input").
    input_key: str = "input"
    teacher_input_key: str = "input"
    # A fresh, not yet set-up instance of the configured method: per-teacher or per-peer copies.
    make_method: Callable[[], Method] | None = None
    # Another model of the student's architecture, initialised from stream ``k`` (online peers).
    make_student: Callable[[int], nn.Module] | None = None
    # A small batch shaped like the data (from the plan's dry run): sizes of scheme-owned parts.
    example: Batch | None = None
    # The training split's size and labels, for methods set up by the scheme (memory banks).
    data_info: DataInfo | None = None
    # Fraction of training samples whose label the student may see (paired data may hide some),
    # and whether this system honours ``batch["labelled"]`` (a teacher trains on every label).
    labelled_fraction: float = 1.0
    honour_labelled: bool = True


class DistillationScheme(L.LightningModule):
    """Base system. Subclasses set ``Options`` (a dataclass of their ``scheme_params``) and the
    teacher count they accept, and implement :meth:`loss_terms`."""

    Options: ClassVar[type] = NoOptions
    # The MNIST-1D experiment that shows the scheme (smoke-tested for every registered scheme).
    example: ClassVar[str] = ""
    # How many teachers the scheme takes: "method" (one if the method needs a teacher, else none),
    # "none", "one", or "many" (one or more).
    teachers_taken: ClassVar[str] = "method"
    # Whether teachers reach the scheme only through :meth:`teacher_outputs`, so a soft-label store
    # (``teacher.source=cache``) can stand in for them.
    reads_teacher_store: ClassVar[bool] = False

    def __init__(self, parts: SystemParts) -> None:
        super().__init__()
        if parts.stage not in ("init", "main"):
            raise ValueError(f"stage must be 'init' or 'main', got {parts.stage!r}")
        self.stage = parts.method.stage = parts.stage
        self.parts = parts
        self.options = parts.options
        self.student = parts.student
        self.method = parts.method
        self.teachers = nn.ModuleList(parts.teachers)
        self.weights = dict(parts.weights)
        self.train_config = parts.train
        self.input_key = parts.input_key
        self.teacher_input_key = parts.teacher_input_key
        # Parts that callbacks add (a learnable temperature): optimised with the student.
        self.extra_modules = nn.ModuleDict()
        self.student_taps = FeatureTaps(parts.student, parts.method.student_taps, role="student")
        self.loss_log = LossLog()
        self.diagnostics: dict[str, torch.Tensor] = {}
        self.metrics = nn.ModuleDict(
            {split: ClassificationMetrics(parts.num_classes, parts.calibration_bins) for split in ("val", "test")}
        )
        self._evaluated: set[str] = set()
        # Mixup/CutMix and SAM live in this class's training step; a scheme with its own cannot use them.
        own_step = type(self).training_step is not DistillationScheme.training_step
        check_mixing(parts, own_step)
        check_sam(parts.train, own_step)
        self.mixer = BatchMixer(parts.train.mix, parts.num_classes) if parts.train.mix.enabled else None
        self._mixed: Batch | None = None
        # Teachers are saved in their own runs, not in every student checkpoint.
        self.register_state_dict_post_hook(_drop_teacher_state)
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_state)

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The first (for most schemes, the only) teacher."""
        return self.teachers[0] if len(self.teachers) else None  # type: ignore[return-value]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.student(inputs)

    # -- training ---------------------------------------------------------------------------------
    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every named loss term of one batch, unweighted."""
        raise NotImplementedError

    def student_output(self, batch: Batch) -> ModelOutput:
        return tapped_forward(self.student, self.student_taps, batch[self.input_key])

    def teacher_outputs(self, batch: Batch) -> list[ModelOutput]:
        return [teacher.outputs(batch, self.teacher_input_key) for teacher in self.teachers]

    def supervised_ce(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Cross-entropy on the samples whose label the student may see (all, unless the batch
        marks some ``labelled=False``: then distillation is their only supervision)."""
        smoothing = self.train_config.label_smoothing
        labelled = batch.get("labelled") if self.parts.honour_labelled else None
        if labelled is None:
            return F.cross_entropy(logits, batch["target"], label_smoothing=smoothing)
        per_sample = F.cross_entropy(logits, batch["target"], label_smoothing=smoothing, reduction="none")
        return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)

    def method_terms(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """CE (when weighted) plus the method's terms: the offline recipe, reused by most schemes."""
        if self.stage == "init":
            return self.method.init_loss(student, teacher, batch)
        terms: dict[str, torch.Tensor] = {}
        if self.weights.get("ce", 0.0):
            terms["ce"] = self.supervised_ce(student.logits, batch)
        terms.update(self.method(student, teacher, batch))
        return terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        batch = self.mixed(batch)
        terms = self.loss_terms(batch)
        loss = self.weighted_sum(terms)
        self.log_terms({**terms, "loss": loss}, batch)
        return loss

    def weighted_sum(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.term_weight(name) * term for name, term in terms.items())  # type: ignore[return-value]

    def mixed(self, batch: Batch) -> Batch:
        """The training batch, mixed when ``train.mix`` is on (SAM's second pass reuses the mix)."""
        if self.mixer is not None and (self._mixed is None or not self.in_sam_second_pass()):
            self._mixed = self.mixer(batch, self.input_key)
        return batch if self.mixer is None else self._mixed  # type: ignore[return-value]

    def in_sam_second_pass(self) -> bool:
        """Whether SAM is re-running this step at perturbed weights (not to be logged twice)."""
        trainer = self._trainer
        return trainer is not None and any(getattr(o, "perturbed", False) for o in trainer.optimizers)

    def log_terms(self, terms: dict[str, torch.Tensor], batch: Batch) -> None:
        if self.in_sam_second_pass():
            self.diagnostics = {}
            return
        self.loss_log.add(self, {**terms, **self.diagnostics}, batch["target"].shape[0])
        self.diagnostics = {}

    def term_weight(self, name: str) -> float:
        return 1.0 if self.stage == "init" else self.weights[name]

    def on_train_epoch_start(self) -> None:
        self.method.epoch = self.current_epoch

    def on_train_epoch_end(self) -> None:
        self.loss_log.log_epoch(self)

    # -- evaluation -------------------------------------------------------------------------------
    def eval_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Logits to score, by name: "" is the student; schemes add exits or peers."""
        return {"": self.student(batch[self.input_key])}

    def _evaluate(self, split: str, batch: Batch, batch_idx: int) -> None:
        counted = counted_rows(self.trainer, split, batch_idx, len(batch["target"]))  # a sharded split's repeats
        target = batch["target"] if counted is None else batch["target"][counted.to(batch["target"].device)]
        for name, logits in self.eval_logits(batch).items():
            key = f"{split}/{name}" if name else split
            if key not in self.metrics:  # an exit or peer seen for the first time
                self.metrics[key] = ClassificationMetrics(self.parts.num_classes, self.parts.calibration_bins)
                self.metrics[key].to(logits.device)
            if len(target):
                self.metrics[key].update(logits if counted is None else logits[counted.to(logits.device)], target)
            self._evaluated.add(key)

    def _log_evaluation(self, split: str) -> None:
        values: dict[str, torch.Tensor] = {}
        for key in sorted(k for k in self._evaluated if k.split("/")[0] == split):
            values.update({f"{key}/{k}": v for k, v in self.metrics[key].compute().items()})
            self.metrics[key].reset()
        self._evaluated -= {k for k in self._evaluated if k.split("/")[0] == split}
        self.log_dict(values, prog_bar=split == "val")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # -- sharding ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Sharding. FSDP2 (``runtime.strategy=fsdp2``, Lightning's ModelParallelStrategy): each
        frozen teacher is sharded on its own and gathered only for its forward
        (``reshard_after_forward``), so a teacher larger than one device fits; then the student,
        then the rest. ZeRO-3 partitions the whole system itself, teachers included."""
        mesh = self.device_mesh
        zero3 = getattr(self._trainer.strategy, "zero_stage_3", False) if self._trainer is not None else False
        if (mesh is None and not zero3) or getattr(self, "_sharded", False):
            return
        self._sharded = True
        for module in self.modules():
            if isinstance(module, TeacherEnsemble):
                module.unstack()  # stacked copies would be whole on every rank
        if mesh is None:  # ZeRO-3 partitions every parameter, frozen or not, and gathers per module
            return
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"]  # shard over data parallelism (a 2-D mesh would replicate)
        for teacher in self.teachers:
            fully_shard(teacher.model, mesh=mesh, reshard_after_forward=True)
        fully_shard(self.student, mesh=mesh)
        fully_shard(self, mesh=mesh)

    # -- optimisation -----------------------------------------------------------------------------
    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the scheme itself owns and trains with the student (heads, peers)."""
        return iter(())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What this stage optimises; teachers' parameters never reach the optimiser."""
        if self.stage == "init":
            yield from self.method.init_parameters(self.student)
            return
        yield from self.student.parameters()
        yield from self.method.trainable_parameters()
        yield from self.scheme_parameters()
        yield from self.extra_modules.parameters()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.trainable_parameters(), self.train_config.optimizer, model=self)
        scheduler = build_scheduler(optimizer, self.train_config.schedule, self.train_config.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def final_metrics(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Results the scheme adds after training and testing (an int8 model's accuracy, say)."""
        return {}

    def export_extra(self) -> dict[str, Any]:
        """What the model file must also record to rebuild the exported model (quantisation)."""
        return {}

    def export_model(self) -> nn.Module:
        """The model to deploy: the student alone (method parts, heads, peers dropped)."""
        return self.student


def _drop_teacher_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + TEACHERS_PREFIX)]:
        del state_dict[key]


def _ignore_missing_teacher_state(module: nn.Module, incompatible: Any) -> None:
    kept = [k for k in incompatible.missing_keys if not k.startswith(TEACHERS_PREFIX)]
    incompatible.missing_keys[:] = kept
