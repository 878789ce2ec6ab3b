"""Temperatures that change during training: a fixed schedule, or CTKD's adversarially learned one.

Response-based methods (kd, dkd, dist, ls_kd, crd_kd) read ``method.temperature`` on every batch,
so a callback that rewrites that attribute drives any of them without touching the method. Both
callbacks check the method in ``setup``: one without a temperature fails before anything trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from kdlab.callbacks.registry import register_callback
from lightning.pytorch.callbacks import Callback
from torch import nn

from kdlab.errors import ConfigError, unknown
from kdlab.methods import METHODS
from kdlab.signature import accepted_kwargs

SCHEDULES = ("linear", "cosine", "step")


def methods_with_temperature() -> list[str]:
    """Registered methods that take a ``temperature`` option: the ones these callbacks can drive."""
    return [name for name in METHODS.names() if "temperature" in accepted_kwargs(METHODS.get(name))]


def temperature_method(pl_module: L.LightningModule, who: str) -> nn.Module:
    """The scheme's method if it has a temperature to set; otherwise say which methods do."""
    method = getattr(pl_module, "method", None)
    if method is None:
        raise ConfigError(f"{who}: scheme {type(pl_module).__name__} has no distillation method")
    if not hasattr(method, "temperature"):
        name = getattr(method, "name", type(method).__name__)
        raise ConfigError(
            f"{who}: method '{name}' has no temperature (methods with one: {', '.join(methods_with_temperature())})"
        )
    return method


@register_callback("temperature_schedule", "set the method's temperature each epoch: linear, cosine or step")
class TemperatureSchedule(Callback):
    """Anneal ``method.temperature`` from ``start`` to ``end``, set at the start of every epoch.

    With ``p = min(epoch, epochs) / epochs`` (``epochs`` defaults to the trainer's ``max_epochs``):
    linear ``start + (end - start) p``, cosine ``end + (start - end) (1 + cos(pi p)) / 2``. As with
    a learning-rate schedule, epoch ``epochs`` is the first at ``end``. ``step`` moves by
    ``(end - start) / len(milestones)`` at each milestone epoch and reaches ``end`` at the last one.
    The value depends on the epoch alone, so a resumed run sees the same temperatures.
    """

    name: ClassVar[str] = "temperature_schedule"

    def __init__(
        self,
        start: float,
        end: float,
        schedule: str = "linear",
        epochs: int | None = None,
        milestones: Sequence[int] = (),
    ) -> None:
        who = f"callback '{self.name}'"
        for key, value in (("start", start), ("end", end)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{who}: {key} must be a positive temperature, got {value}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"{who}: {unknown('schedule', schedule, SCHEDULES)}")
        milestones = tuple(milestones)
        if schedule == "step":
            if epochs is not None:
                raise ConfigError(f"{who}: 'epochs' does not apply to schedule 'step' (it uses milestones)")
            if not milestones:
                raise ConfigError(f"{who}: schedule 'step' needs milestones (epochs at which the temperature moves)")
            integers = all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
            if not (integers and milestones[0] > 0 and list(milestones) == sorted(set(milestones))):
                raise ConfigError(f"{who}: milestones must be increasing positive epochs, got {list(milestones)}")
        else:
            if milestones:
                raise ConfigError(f"{who}: milestones only apply to schedule 'step', not '{schedule}'")
            if epochs is not None and epochs < 1:
                raise ConfigError(f"{who}: epochs must be at least 1, got {epochs}")
        self.start, self.end, self.schedule = float(start), float(end), schedule
        self.epochs, self.milestones = epochs, milestones
        self.total = epochs

    def temperature_at(self, epoch: int) -> float:
        """The temperature of (0-based) ``epoch``."""
        if self.schedule == "step":
            passed = sum(epoch >= m for m in self.milestones)
            return self.start + (self.end - self.start) * passed / len(self.milestones)
        assert self.total is not None, "setup() resolves the schedule length"
        progress = min(epoch, self.total) / self.total
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * (1 + math.cos(math.pi * progress)) / 2

    def validate(self, pl_module: L.LightningModule) -> None:
        """The checks of :meth:`setup` that need no trainer (kdlab's planning runs them early)."""
        temperature_method(pl_module, f"callback '{self.name}'")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        who = f"callback '{self.name}'"
        self.validate(pl_module)
        if self.schedule != "step" and self.epochs is None:
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ConfigError(f"{who}: set 'epochs' (the trainer has no max_epochs to anneal over)")
            self.total = trainer.max_epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        temperature = self.temperature_at(trainer.current_epoch)
        pl_module.method.temperature = temperature
        pl_module.log("train/temperature", temperature, on_step=False, on_epoch=True, batch_size=1)


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength`` (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


class GlobalTemperature(nn.Module):
    """CTKD's global temperature ``t_start + t_range * sigmoid(logit)``, bounded to [t_start, t_start + t_range].

    The logit passes a gradient reversal layer first (as in the authors' ``Global_T``), so the
    optimiser that lowers the distillation loss for the student raises it for the temperature.
    """

    def __init__(self, t_start: float, t_range: float, init_logit: float) -> None:
        super().__init__()
        self.t_start, self.t_range = t_start, t_range
        self.logit = nn.Parameter(torch.tensor(float(init_logit)))

    def forward(self, strength: float) -> torch.Tensor:
        return self.t_start + self.t_range * torch.sigmoid(_ReverseGradient.apply(self.logit, strength))


@register_callback(
    "ctkd", "CTKD: a global temperature learned adversarially, with a cosine curriculum [Li et al. 2023]"
)
class CurriculumTemperature(Callback):
    """Curriculum Temperature KD (Li et al., AAAI 2023, arXiv:2211.16231), for any method with a temperature.

    A :class:`GlobalTemperature` joins the scheme as ``extra_modules["ctkd"]``, so the student's
    optimiser trains it and checkpoints hold it. Each batch sets ``method.temperature`` to its
    output, a 0-d tensor: the student minimises the loss while the reversed gradient makes the
    temperature maximise it, scaled by ``lambda``, which rises from ``lambda_min`` to ``lambda_max``
    along a cosine over the first ``curriculum_epochs`` epochs (easy to hard). ``lambda`` depends
    on the epoch alone, so a resumed run is exact.

    Defaults are the authors' CIFAR-100 script (github.com/zhengli97/CTKD, scripts/run_cifar_distill.sh
    and train_student.py): ``--t_start 1 --t_end 20`` with ``T = t_start + t_end * sigmoid(.)`` (so
    t_end is the range: T in [1, 21]), ``Global_T``'s logit initialised to 1 (T = 15.6), and
    ``--decay_max 0 --decay_min -1 --decay_loops 10`` through their GRL that multiplies by that
    (negative) value, i.e. ``lambda`` from 0 to 1 over 10 epochs (the paper's lambda_max = 1).
    """

    name: ClassVar[str] = "ctkd"

    def __init__(
        self,
        t_start: float = 1.0,
        t_range: float = 20.0,
        init_logit: float = 1.0,
        lambda_min: float = 0.0,
        lambda_max: float = 1.0,
        curriculum_epochs: int = 10,
    ) -> None:
        who = f"callback '{self.name}'"
        if not (t_start > 0 and t_range > 0):
            raise ConfigError(f"{who}: t_start and t_range must be positive, got {t_start} and {t_range}")
        if not lambda_min <= lambda_max:
            raise ConfigError(f"{who}: lambda_min ({lambda_min}) must not exceed lambda_max ({lambda_max})")
        if curriculum_epochs < 1:
            raise ConfigError(f"{who}: curriculum_epochs must be at least 1, got {curriculum_epochs}")
        self.t_start, self.t_range, self.init_logit = float(t_start), float(t_range), float(init_logit)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.curriculum_epochs = curriculum_epochs
        self.module: GlobalTemperature | None = None
        self._sum: torch.Tensor | float = 0.0
        self._batches = 0

    def strength(self, epoch: int) -> float:
        """``lambda`` of the 0-based ``epoch``: the paper's cosine curriculum at epoch ``n = epoch + 1``.

        The authors' loop counts epochs from 1, so the first epoch already has a small ``lambda``
        and the ``curriculum_epochs``-th one has ``lambda_max``.
        """
        n = min(epoch + 1, self.curriculum_epochs)
        rise = (1 - math.cos(math.pi * n / self.curriculum_epochs)) / 2
        return self.lambda_min + (self.lambda_max - self.lambda_min) * rise

    def validate(self, pl_module: L.LightningModule) -> nn.ModuleDict:
        """The checks of :meth:`setup` that need no trainer (kdlab's planning runs them early)."""
        who = f"callback '{self.name}'"
        temperature_method(pl_module, who)
        extra = getattr(pl_module, "extra_modules", None)
        if not isinstance(extra, nn.ModuleDict):
            raise ConfigError(
                f"{who}: scheme {type(pl_module).__name__} has no extra_modules to train a temperature in"
            )
        return extra

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning runs this before configure_optimizers and before restoring a checkpoint, so
        # the optimiser sees the temperature and a resumed run loads its trained value.
        extra = self.validate(pl_module)
        if self.name not in extra:
            extra[self.name] = GlobalTemperature(self.t_start, self.t_range, self.init_logit)
        self.module = extra[self.name]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sum, self._batches = 0.0, 0
        pl_module.log(
            "train/ctkd_lambda", self.strength(trainer.current_epoch), on_step=False, on_epoch=True, batch_size=1
        )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.module is not None, "setup() adds the temperature module"
        temperature = self.module(self.strength(trainer.current_epoch))
        pl_module.method.temperature = temperature
        # Summed as a tensor (no device sync) and logged once per epoch: self.log per step is slow.
        self._sum = self._sum + temperature.detach()
        self._batches += 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Release the batch's graph: between batches the method holds a plain value that can be copied.
        pl_module.method.temperature = pl_module.method.temperature.detach()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batches:
            pl_module.log("train/temperature", self._sum / self._batches, on_step=False, on_epoch=True)
