"""Multi-teacher distillation: N frozen teachers of any architectures teach one student.

Two ways to combine them:

- ``combine: probs | logits``: the teachers become one teacher (averaged soft labels at the
  method's temperature, or averaged logits) that any response method distils;
- ``combine: per_teacher``: the method runs once per teacher, each with its own parts (a FitNet
  regressor per teacher: feature-level multi-teacher), and the terms are averaged.

Weights are equal, fixed, or adaptive per sample (``confidence``: CA-MKD; ``entropy``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput
from kdlab.methods.base import Method
from kdlab.schemes.base import DistillationScheme, SystemParts
from kdlab.schemes.ensemble import COMBINE_MODES, WEIGHTINGS, TeacherEnsemble, combine_logits, teacher_weights
from kdlab.schemes.registry import register_scheme


@dataclass
class MultiTeacherOptions:
    combine: str = "probs"  # probs | logits | per_teacher
    weighting: str = "equal"  # equal | fixed | confidence | entropy
    weights: list[float] = field(default_factory=list)  # with weighting=fixed: one per teacher
    # Temperature of the probability average and the entropy weights; None: the method's.
    temperature: float | None = None
    # Same-architecture teachers as one vmap-ed forward (False: a Python loop, e.g. to compare).
    vectorize: bool = True

    def check(self) -> None:
        if self.combine not in COMBINE_MODES:
            raise ConfigError(f"multi_teacher: unknown combine '{self.combine}' (valid: {', '.join(COMBINE_MODES)})")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"multi_teacher: unknown weighting '{self.weighting}' (valid: {', '.join(WEIGHTINGS)})")
        if self.weighting == "fixed" and (not self.weights or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ConfigError(f"multi_teacher: weighting=fixed needs non-negative weights, got {self.weights}")


def setup_method_copies(parts: SystemParts, student: ModelOutput, teachers: list[ModelOutput]) -> list[Method]:
    """The configured method for each teacher: the planned one for the first, fresh copies (own
    regressors, memory banks) set up on the example batch for the others."""
    methods = [parts.method]
    for teacher in teachers[1:]:
        assert parts.make_method is not None and parts.data_info is not None
        method = parts.make_method()
        method.setup(student, teacher, parts.data_info)
        methods.append(method)
    return methods


def averaged_terms(
    methods: list[Method], student: ModelOutput, teachers: list[ModelOutput], weights: torch.Tensor, batch: Batch
) -> dict[str, torch.Tensor]:
    """Each teacher's method terms, weighted by its batch-mean weight (``weights``: ``[K, B]``)."""
    terms: dict[str, torch.Tensor] = {}
    for method, teacher, weight in zip(methods, teachers, weights.mean(dim=1), strict=True):
        for name, value in method(student, teacher, batch).items():
            terms[name] = terms[name] + weight * value if name in terms else weight * value
    return terms


@register_scheme(
    "multi_teacher", "N frozen teachers: averaged soft labels or per-teacher terms; fixed or adaptive weights"
)
class MultiTeacherDistillation(DistillationScheme):
    example = "mnist1d-multi-teacher"
    Options = MultiTeacherOptions
    teachers_taken = "many"

    def __init__(self, parts: SystemParts) -> None:
        super().__init__(parts)
        options: MultiTeacherOptions = self.options
        count = len(parts.teachers)
        if count == 0:
            raise ConfigError("multi_teacher: no teachers; list them in 'teachers' (e.g. teachers=[{},{},{}])")
        if options.weighting == "fixed" and len(options.weights) != count:
            raise ConfigError(f"multi_teacher: {len(options.weights)} fixed weights for {count} teachers")
        if options.combine != "per_teacher" and (parts.method.teacher_taps or parts.method.student_taps):
            raise ConfigError(
                f"multi_teacher: method '{parts.method.name}' distils features; averaged soft labels"
                " have none, so use scheme_params.combine=per_teacher (one adapter per teacher)"
            )
        if parts.method.init_epochs and count > 1:
            raise ConfigError(f"multi_teacher: method '{parts.method.name}' has an initialisation stage; not supported")
        self.ensemble = TeacherEnsemble(parts.teachers, parts.method.teacher_taps, options.vectorize)
        self.temperature = options.temperature or float(getattr(parts.method, "temperature", 1.0))
        self.teacher_methods = nn.ModuleList()
        if options.combine == "per_teacher" and parts.example is not None:
            with torch.no_grad():
                example = copy.copy(parts.example)
                student = self.student_output(example)
                teachers = self.ensemble(example[self.teacher_input_key])  # type: ignore[literal-required]
            self.teacher_methods.extend(setup_method_copies(parts, student, teachers)[1:])

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        options: MultiTeacherOptions = self.options
        student = self.student_output(batch)
        teachers = self.ensemble(batch[self.teacher_input_key])  # type: ignore[literal-required]
        logits = torch.stack([t.logits for t in teachers])
        weights = teacher_weights(logits, batch["target"], options.weighting, options.weights, self.temperature)
        for k, weight in enumerate(weights.mean(dim=1)):
            self.diagnostics[f"teacher{k}_weight"] = weight.detach()
        if options.combine == "per_teacher":
            terms: dict[str, torch.Tensor] = {}
            if self.weights.get("ce", 0.0):
                terms["ce"] = self.supervised_ce(student.logits, batch)
            methods = [self.method, *self.teacher_methods]
            terms.update(averaged_terms(methods, student, teachers, weights, batch))  # type: ignore[arg-type]
            return terms
        combined = ModelOutput(combine_logits(logits, weights, options.combine, self.temperature))
        return self.method_terms(student, combined, batch)

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        return self.teacher_methods.parameters()
