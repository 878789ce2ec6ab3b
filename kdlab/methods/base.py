"""A method owns the math of one distillation paper: outputs in, named loss terms out.

The scheme owns the loop. It computes the supervised ``ce`` term itself, asks the method for the
rest, and sums ``weight[name] * term``. A method is an ``nn.Module`` so it can own trainable parts
(regressors, embedding heads) that train with the student and are dropped at export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from kdlab.data.base import Batch
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
    """Base class: subclasses set the class attributes and implement :meth:`forward`."""

    name: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    needs_teacher: ClassVar[bool] = True
    # Every loss term the method can return, with the paper's weight; "ce" is the supervised term
    # that the scheme computes.
    default_weights: ClassVar[Mapping[str, float]] = {"ce": 1.0}
    # Named layers (see kdlab.features) the method needs from each model.
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def setup(self, student: ModelOutput, teacher: ModelOutput | None) -> None:
        """Build parts whose shapes depend on the models (called once, on a dry-run batch)."""

    @abstractmethod
    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        """Return the method's loss terms by name (all but ``ce``)."""
