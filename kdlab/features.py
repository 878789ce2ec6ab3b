"""Named intermediate features through forward hooks, so no model is edited for a method.

Methods ask for features with *tap specs* that mean the same thing on every architecture:

- ``embedding``: the penultimate vector the classifier reads (RepDistiller's ``feat[-1]``);
- ``stage:K``: the output of stage ``K`` (0-based, negative from the end; ``feat[1:-1]``);
- ``stages``: all stage outputs, shallow to deep (a list);
- ``stem``: the output of the stem, before the first stage (``feat[0]``);
- ``stem+stages``: the stem (where the model has one) and every stage (``feat[:-1]``);
- ``preact:K`` / ``preacts``: stage outputs before their final ReLU (RepDistiller's ``preact=True``);
- or any module name from ``model.named_modules()``, optionally with ``:input`` for what enters it.

A model says where these are with ``feature_taps`` (optional ``"stem"`` first, the stages, the
embedding last) and optionally ``preact_taps`` (one per stage). Models without them (any timm
model) are read through timm's ``feature_info`` and ``global_pool``. :class:`FeatureTaps` registers
the hooks once; :meth:`FeatureTaps.collect` returns the features of the last forward by spec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlab.errors import KdlabError, did_you_mean

INPUT_SUFFIX = ":input"
Feature = torch.Tensor | list[torch.Tensor]


@dataclass
class ModelOutput:
    """What a method sees of a model: logits and the features it asked for, keyed by tap spec."""

    logits: torch.Tensor
    features: dict[str, Feature] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureLayout:
    """Where a model's stem, stages, pre-activations and embedding are, as module taps."""

    stem: str | None
    stages: tuple[str, ...]
    embedding: str | None
    preacts: tuple[str, ...] | None


def feature_layout(model: nn.Module) -> FeatureLayout:
    """The layout a model declares (``feature_taps``/``preact_taps``), or timm's ``feature_info``."""
    declared = getattr(model, "feature_taps", None)
    if declared:
        stem = declared[0] if declared[0] == "stem" else None
        stages = tuple(declared[1 if stem else 0 : -1])
        preacts = getattr(model, "preact_taps", None)
        return FeatureLayout(stem, stages, declared[-1], tuple(preacts) if preacts else _last_out_acts(model, stages))
    info = getattr(model, "feature_info", None)
    if info is not None:  # a timm model: its feature levels, the first being the stem if it is finer
        modules = dict(model.named_modules())
        levels = [entry for entry in info if entry["module"] in modules]
        has_stem = len(levels) > 1 and levels[0]["reduction"] < levels[1]["reduction"]
        stem = levels[0]["module"] if has_stem else None
        stages = tuple(entry["module"] for entry in levels[1 if has_stem else 0 :])
        return FeatureLayout(stem, stages, "global_pool" if "global_pool" in modules else None, None)
    return FeatureLayout(None, (), None, None)


def _last_out_acts(model: nn.Module, stages: Sequence[str]) -> tuple[str, ...] | None:
    """Pre-activations as the inputs of each stage's last ``out_act`` (the zoo's convention)."""
    names = [name for name, _ in model.named_modules()]
    taps = []
    for stage in stages:
        acts = [n for n in names if n.startswith(stage + ".") and n.endswith(".out_act")]
        if not acts:
            return None
        taps.append(acts[-1] + INPUT_SUFFIX)
    return tuple(taps)


def resolve_tap(model: nn.Module, spec: str, role: str = "model") -> str | list[str]:
    """The module tap(s) behind a spec; a spec the model cannot provide is a clear error."""
    layout = feature_layout(model)
    kind, _, index = spec.partition(":")
    name = type(model).__name__

    def need(value: object, what: str) -> None:
        if not value:
            raise KdlabError(f"{role} ({name}) has no {what}, which tap '{spec}' needs; declare it with feature_taps")

    if spec == "embedding":
        need(layout.embedding, "embedding layer")
        return layout.embedding  # type: ignore[return-value]
    if spec == "stem":
        need(layout.stem, "stem")
        return layout.stem  # type: ignore[return-value]
    if spec == "stages":
        need(layout.stages, "stages")
        return list(layout.stages)
    if spec == "stem+stages":
        need(layout.stages, "stages")
        return ([layout.stem] if layout.stem else []) + list(layout.stages)
    if spec == "preacts":
        need(layout.preacts, "pre-activation features (preact_taps)")
        return list(layout.preacts)  # type: ignore[arg-type]
    if kind in ("stage", "preact") and index.lstrip("-").isdigit():
        taps = layout.stages if kind == "stage" else layout.preacts
        need(taps, "stages" if kind == "stage" else "pre-activation features (preact_taps)")
        assert taps is not None
        position = int(index)
        if not -len(taps) <= position < len(taps):
            raise KdlabError(f"{role} ({name}) has {len(taps)} stages; tap '{spec}' is out of range")
        return taps[position]
    check_taps(model, [spec], role)
    return spec


def check_taps(model: nn.Module, taps: Sequence[str], role: str) -> None:
    """Fail before training when a tap names no module, listing the model's tappable layers."""
    modules = dict(model.named_modules())
    for tap in taps:
        module_name = tap.removesuffix(INPUT_SUFFIX)
        if module_name not in modules or module_name == "":
            valid = [n for n in modules if n]
            hint = did_you_mean(module_name, valid)
            canonical = getattr(model, "feature_taps", None)
            listing = ", ".join(canonical) if canonical else ", ".join(valid[:30])
            raise KdlabError(
                f"{role} ({type(model).__name__}) has no layer '{module_name}'{'; ' + hint if hint else ''}"
                f" (layers: {listing}; also embedding, stage:K, stages, stem, preact:K, preacts,"
                " or any name from model.named_modules())"
            )


class FeatureTaps:
    """Forward hooks for the given specs on ``model``; :meth:`collect` returns and clears the features."""

    def __init__(self, model: nn.Module, specs: Sequence[str], role: str = "model") -> None:
        self.specs = tuple(specs)
        self._resolved = {spec: resolve_tap(model, spec, role) for spec in self.specs}
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        taps = {tap for value in self._resolved.values() for tap in ([value] if isinstance(value, str) else value)}
        for tap in sorted(taps):
            module_name = tap.removesuffix(INPUT_SUFFIX)
            hook = self._hook(tap, tap.endswith(INPUT_SUFFIX))
            self._handles.append(modules[module_name].register_forward_hook(hook))

    def _hook(self, tap: str, wants_input: bool) -> Callable[..., None]:
        def store(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._captured[tap] = inputs[0] if wants_input else output

        return store

    def collect(self) -> dict[str, Feature]:
        captured, self._captured = self._captured, {}
        features: dict[str, Feature] = {}
        for spec, resolved in self._resolved.items():
            taps = [resolved] if isinstance(resolved, str) else resolved
            missing = [t for t in taps if t not in captured]
            if missing:
                raise KdlabError(f"layers {missing} did not run in the forward pass, so they cannot be tapped")
            features[spec] = captured[resolved] if isinstance(resolved, str) else [captured[t] for t in resolved]
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def tapped_forward(model: nn.Module, taps: FeatureTaps | None, inputs: torch.Tensor) -> ModelOutput:
    """Run ``model`` and pair its logits with the tapped features."""
    logits = model(inputs)
    return ModelOutput(logits, taps.collect() if taps is not None else {})


def classifier_parameters(model: nn.Module) -> set[int]:
    """Ids of the final classifier's parameters (``fc``, or timm's ``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    return {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Everything but the classifier: what initialisation stages (AB, FSP) train."""
    head = classifier_parameters(model)
    return [p for p in model.parameters() if id(p) not in head]
