"""Teacher-assistant chains: TAKD (Mirzadeh et al., AAAI 2020) and DGKD (Son et al., ICCV 2021).

One experiment declares the chain teacher -> assistant(s) -> student. Each assistant is a run of
its own (group ``assistants``), trained by the experiment's method and recipe from the model
before it, and reused whenever another experiment resolves to the same chain prefix. With
``dgkd: true`` every earlier model guides the next (the method's terms averaged over them)
instead of only the previous one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdlab.config import ModelConfig, spec_dict
from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.schemes.base import DistillationScheme, SystemParts
from kdlab.schemes.ensemble import TeacherEnsemble
from kdlab.schemes.multi_teacher import per_teacher_methods, per_teacher_terms
from kdlab.schemes.registry import register_scheme

if TYPE_CHECKING:
    from kdlab.planning import Plan

ASSISTANT_GROUP = "assistants"
ASSISTANT_SEED_OFFSET = 3_000_017


@dataclass
class AssistantOptions:
    # The intermediate models, largest first: e.g. [{name: mnist1d_cnn, kwargs: {channels: 16}}].
    assistants: list[dict[str, Any]] = field(default_factory=list)
    dgkd: bool = False  # every earlier model guides the next (DGKD), not only the previous one

    def check(self) -> None:
        if not self.assistants:
            raise ConfigError("assistant: list at least one model in scheme_params.assistants")
        for index, entry in enumerate(self.assistants, start=1):
            if not entry.get("name"):
                raise ConfigError(f"assistant: stage {index} of the chain names no model (missing 'name'): {entry}")
            unknown = set(entry) - {"name", "kwargs"}
            if unknown:
                raise ConfigError(f"assistant: stage {index} has unknown keys {sorted(unknown)} (valid: name, kwargs)")

    def models(self) -> list[ModelConfig]:
        return [ModelConfig(name=e["name"], kwargs=dict(e.get("kwargs") or {})) for e in self.assistants]


def check_chain(teacher: ModelConfig, assistants: list[ModelConfig], student: ModelConfig) -> None:
    """A chain visits each model once: a repeated model would distil a model into itself."""
    chain = [("teacher", teacher), *((f"assistant {i}", a) for i, a in enumerate(assistants, 1)), ("student", student)]
    seen: dict[str, str] = {}
    for role, model in chain:
        key = f"{model.name}{sorted(model.kwargs.items())}"
        if key in seen:
            raise ConfigError(
                f"assistant: the chain is a cycle: {role} is the same model as {seen[key]}"
                f" ({model.name}, {model.kwargs})"
            )
        seen[key] = role


@register_scheme("assistant", "teacher -> assistant(s) -> student chain (TAKD); dgkd: all earlier models guide")
class AssistantChain(DistillationScheme):
    example = "mnist1d-takd"
    Options = AssistantOptions
    teachers_taken = "one"

    def __init__(self, parts: SystemParts) -> None:
        super().__init__(parts)
        self.ensemble = TeacherEnsemble(parts.teachers, parts.method.teacher_taps)
        if len(parts.teachers) > 1 and parts.method.init_epochs:
            raise ConfigError(f"assistant: dgkd with method '{parts.method.name}' (an init stage) is not supported")
        self.guide_methods = nn.ModuleList(per_teacher_methods(self, self.ensemble))

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        student = self.student_output(batch)
        guides = self.ensemble(batch[self.teacher_input_key])  # type: ignore[literal-required]
        if len(guides) == 1:
            return self.method_terms(student, guides[0], batch)
        equal = student.logits.new_full((len(guides), student.logits.shape[0]), 1.0 / len(guides))
        methods = [self.method, *self.guide_methods]
        return per_teacher_terms(self, methods, student, guides, equal, batch)  # type: ignore[arg-type]

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        return self.guide_methods.parameters()

    @classmethod
    def plan_chain(cls, plan: Plan) -> list[dict[str, Any]]:
        """Build and check each assistant, and name its run by everything that determines it."""
        from kdlab.methods import METHODS
        from kdlab.methods.registry import resolved_params
        from kdlab.planning import ChainLink, build_model, check_model, data_spec, example_batch, recipe_spec
        from kdlab.runs import Run

        config, options = plan.config, plan.options
        batch = example_batch(plan.datamodule)
        source = type(plan.datamodule).__name__
        method = {
            "name": config.method.name,
            "params": resolved_params(METHODS.get(config.method.name), config.method.params),
            "weights": plan.weights,
        }
        models = options.models()
        check_chain(plan.teachers[0].config.model, models, config.student.model)
        guides = [plan.teachers[0].key]
        for index, model_config in enumerate(models, start=1):
            role = f"assistant {index}"
            model = build_model(role, model_config, plan.datamodule, config.seed + index * ASSISTANT_SEED_OFFSET)
            num_classes = plan.datamodule.num_classes
            check_model(role, model, plan.method.student_taps, batch["input"], num_classes, source)
            spec = {
                "stage": "assistant",
                "seed": config.seed,
                "data": data_spec(config, config.student.train.augment),
                "student": {"model": spec_dict(model_config), "train": recipe_spec(config.student.train)},
                "method": method,
                "guides": list(guides),
            }
            run = Run.for_spec(config.runtime.runs_dir, ASSISTANT_GROUP, spec)
            plan.chain.append(ChainLink(model_config, model, run))
            guides = [*guides, run.hash] if options.dgkd else [run.hash]
        return [{"run": link.run.hash} for link in plan.chain]

    @classmethod
    def execute_chain(
        cls, plan: Plan, teachers: list[nn.Module], temperatures: list[float]
    ) -> tuple[list[nn.Module], list[float], list[dict[str, Any]]]:
        """Train (or reuse) each assistant in order; return the final student's guides."""
        from kdlab.methods import create_method
        from kdlab.modelio import load_model_weights
        from kdlab.pipeline import ensure_student
        from kdlab.planning import setup_method

        guides, temps, results = list(teachers), list(temperatures), []
        for index, link in enumerate(plan.chain, start=1):
            method = create_method(plan.config.method)
            stage = replace(plan, student=link.model, method=method, student_run=link.run, chain=[])
            setup_method(stage, guides)
            results.append(ensure_student(stage, guides, temps, f"assistant {index}", link.model_config))
            load_model_weights(link.model, link.run.model_path)
            guides, temps = ([*guides, link.model], [*temps, 1.0]) if plan.options.dgkd else ([link.model], [1.0])
        return guides, temps, results
