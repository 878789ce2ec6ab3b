"""FitNets: a regressor maps a middle ("guided") student layer onto the teacher's hint layer."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import INPUT_SUFFIX, ModelOutput, classifier_parameters, resolve_tap
from kdlab.losses.feature import hint_loss
from kdlab.methods.adapters import ConvReg
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import register_method


def parameters_up_to(model: nn.Module, tap: str) -> list[nn.Parameter]:
    """The parameters of the layers that compute a tapped feature: those of every module registered
    before the tapped one, plus its own unless the tap is its ``:input``; the classifier never.

    This reads the model's registration order as its execution order, which holds for the zoo
    (tests check it against the autograd dependencies of the feature).
    """
    module_name = tap.removesuffix(INPUT_SUFFIX)
    include_tapped = not tap.endswith(INPUT_SUFFIX)
    names = [name for name, _ in model.named_modules()]
    position = names.index(module_name)
    head = classifier_parameters(model)
    chosen: dict[int, nn.Parameter] = {}
    for index, (name, module) in enumerate(model.named_modules()):
        inside = name == module_name or name.startswith(module_name + ".")
        if index < position or (include_tapped and inside):
            chosen.update({id(p): p for p in module.parameters(recurse=False) if id(p) not in head})
    return list(chosen.values())


@register_method
class FitNet(Method):
    """FitNet: MSE between a regressed student stage and the teacher's (hint) stage."""

    name = "fitnet"
    paper = Paper(
        title="FitNets: Hints for Thin Deep Nets",
        authors="Romero, Ballas, Kahou, Chassang, Gatta, Bengio",
        year=2015,
        venue="ICLR",
        arxiv="1412.6550",
    )
    # RepDistiller / CRD: -r 1 -a 0 -b 100.
    default_weights = {"ce": 1.0, "hint": 100.0}
    # The default hint; an instance's ``hint`` parameter replaces both.
    student_taps = ("stage:1",)
    teacher_taps = ("stage:1",)

    def __init__(self, hint: str = "stage:1", init_epochs: int = 0, init_lr: float | None = None) -> None:
        """``hint``: the tap of both models (RepDistiller's ``hint_layer=2``: the second stage).
        ``init_epochs > 0`` adds Romero et al.'s stage 1, which trains the student up to the
        guided layer and the regressor on the hint loss alone; RepDistiller (and the CRD table)
        trains in one stage, hint loss and CE together."""
        super().__init__()
        self.hint = hint
        self.student_taps = self.teacher_taps = (hint,)
        self.set_init_stage(init_epochs, init_lr)
        self.regressor: nn.Module | None = None

    def setup(self, student: ModelOutput, teacher: ModelOutput | None, data: DataInfo) -> None:
        assert teacher is not None
        s_hint, t_hint = student.features[self.hint], teacher.features[self.hint]
        if isinstance(s_hint, list) or isinstance(t_hint, list):
            raise ConfigError(f"fitnet: hint '{self.hint}' must name one layer, not a list of them")
        self.regressor = ConvReg(s_hint.shape, t_hint.shape, use_relu=True)

    def _hint_term(self, student: ModelOutput, teacher: ModelOutput | None) -> dict[str, torch.Tensor]:
        assert teacher is not None and self.regressor is not None, "setup() builds the regressor first"
        return {"hint": hint_loss(self.regressor(student.features[self.hint]), teacher.features[self.hint])}

    def forward(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return self._hint_term(student, teacher)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        tap = resolve_tap(student, self.hint, "student")
        assert isinstance(tap, str)
        assert self.regressor is not None
        return [*parameters_up_to(student, tap), *self.regressor.parameters()]

    def init_loss(self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch) -> dict[str, torch.Tensor]:
        return self._hint_term(student, teacher)
