"""Multi-teacher distillation: N frozen teachers of any architectures teach one student.

Two ways to combine them:

- ``combine: probs | logits``: the teachers become one teacher (averaged soft labels at the
  method's temperature, or averaged logits) that any response method distils;
- ``combine: per_teacher``: the method runs once per teacher, each with its own parts (a FitNet
  regressor per teacher: feature-level multi-teacher), and the terms are averaged.

Weights are equal, fixed, or adaptive per sample (``confidence``: CA-MKD; ``entropy``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput
from kdlab.methods.base import Method
from kdlab.schemes.base import DistillationScheme, SystemParts, probing
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


def per_teacher_methods(scheme: DistillationScheme, ensemble: TeacherEnsemble) -> list[Method]:
    """Fresh copies of the configured method for the second teacher on (own regressors, memory
    banks), each set up on the example batch against its teacher; the first teacher keeps the
    planned method."""
    parts = scheme.parts
    assert parts.example is not None and parts.make_method is not None and parts.data_info is not None
    with probing(parts.student):
        student = scheme.student_output(parts.example)
        teachers = ensemble(parts.example[scheme.teacher_input_key])  # type: ignore[literal-required]
    methods = []
    for teacher in teachers[1:]:
        method = parts.make_method()
        method.setup(student, teacher, parts.data_info)
        methods.append(method)
    return methods


def per_teacher_terms(
    scheme: DistillationScheme,
    methods: list[Method],
    student: ModelOutput,
    teachers: list[ModelOutput],
    weights: torch.Tensor,
    batch: Batch,
) -> dict[str, torch.Tensor]:
    """CE (when weighted) plus each teacher's method terms, weighted by its batch-mean weight
    (``weights``: ``[K, B]``)."""
    terms: dict[str, torch.Tensor] = {}
    if scheme.weights.get("ce", 0.0):
        terms["ce"] = scheme.supervised_ce(student.logits, batch)
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
        per_teacher = options.combine == "per_teacher"
        self.teacher_methods = nn.ModuleList(per_teacher_methods(self, self.ensemble) if per_teacher else [])

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        options: MultiTeacherOptions = self.options
        student = self.student_output(batch)
        teachers = self.ensemble(batch[self.teacher_input_key])  # type: ignore[literal-required]
        logits = torch.stack([t.logits for t in teachers])
        weights = teacher_weights(logits, batch["target"], options.weighting, options.weights, self.temperature)
        for k, weight in enumerate(weights.mean(dim=1)):
            self.diagnostics[f"teacher{k}_weight"] = weight.detach()
        if options.combine == "per_teacher":
            methods = [self.method, *self.teacher_methods]
            return per_teacher_terms(self, methods, student, teachers, weights, batch)  # type: ignore[arg-type]
        combined = ModelOutput(combine_logits(logits, weights, options.combine, self.temperature))
        return self.method_terms(student, combined, batch)

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        return self.teacher_methods.parameters()
