"""A method owns the math of one distillation paper: outputs in, named loss terms out.

The scheme owns the loop. It computes the supervised ``ce`` term itself, asks the method for the
rest, and sums ``weight[name] * term``. A method is an ``nn.Module`` so it can own trainable parts
(regressors, embedding heads) that train with the student and are dropped at export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.features import ModelOutput


@dataclass(frozen=True)
class Paper:
    """Where a method comes from; shown by `kdlab list methods` and in the README."""

    title: str
    authors: str
    year: int
    venue: str = ""
    arxiv: str = ""

    def cite(self) -> str:
        where = f", {self.venue}" if self.venue else ""
        arxiv = f", arXiv:{self.arxiv}" if self.arxiv else ""
        return f"{self.authors} ({self.year}), {self.title}{where}{arxiv}"


class Method(nn.Module, ABC):
    """Base class: subclasses set the class attributes and implement :meth:`forward`.

    Parts a method owns (regressors, embedding heads, memory banks) are submodules built in
    :meth:`setup`; they train with the student (see :meth:`trainable_parameters`) and are not part
    of the exported student. A method that needs initialisation epochs (FitNet stage 1, AB, FT,
    FSP) sets ``init_epochs`` and implements :meth:`init_parameters` and :meth:`init_loss`; the
    pipeline runs that stage first, in the same run folder, then the main training.
    """

    name: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    needs_teacher: ClassVar[bool] = True
    # True when student and teacher features must have equal channel counts, with no adapter
    # (FSP): such a method only fits same-width pairs (the CRD paper leaves it out of cross pairs).
    needs_equal_widths: ClassVar[bool] = False
    # True when the distillation terms read labels (DKD's target split, CRD's other-class
    # negatives): such a method is supervision too, so it cannot teach samples without labels.
    uses_labels: ClassVar[bool] = False
    # Every loss term the method can return, with the paper's weight; "ce" is the supervised term
    # that the scheme computes.
    default_weights: ClassVar[Mapping[str, float]] = {"ce": 1.0}
    # Tap specs (see kdlab.features: "embedding", "stage:-1", "stages", "preacts", a module name)
    # of the features the method needs from each model.
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()
    # Initialisation stage: epochs, and its constant learning rate (None: the student's).
    init_epochs: int = 0
    init_lr: float | None = None

    def __init__(self) -> None:
        super().__init__()
        self.stage = "main"  # or "init"; set by the scheme
        self.epoch = 0  # the current training epoch, set by the scheme (warm-ups such as DKD's)

    def set_init_stage(self, init_epochs: int, init_lr: float | None) -> None:
        """Validate and keep the initialisation stage's length and (constant) learning rate."""
        if init_epochs < 0:
            raise ValueError(f"init_epochs must be >= 0, got {init_epochs}")
        if init_lr is not None and init_lr <= 0:
            raise ValueError(f"init_lr must be positive, got {init_lr}")
        self.init_epochs = init_epochs
        self.init_lr = init_lr

    def set_temperature(self, temperature: float) -> None:
        """Validate and keep a softening temperature (what the temperature callbacks later set)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        """Build parts whose shapes depend on the models or the data (called once, before
        training, on a dry-run batch through both models)."""

    @abstractmethod
    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Return the method's loss terms by name (all but ``ce``)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The method's parameters the main stage optimises with the student (default: all)."""
        return self.parameters()

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """What the initialisation stage trains (student layers and/or the method's own parts)."""
        raise NotImplementedError(f"method '{self.name}' sets init_epochs but not init_parameters")

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss terms of the initialisation stage (summed with weight 1, as in RepDistiller)."""
        raise NotImplementedError(f"method '{self.name}' sets init_epochs but not init_loss")
