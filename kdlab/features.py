"""Named intermediate features through forward hooks, so no model is edited for a method.

A tap is a module name (``layer3``: that module's output) or ``name:input`` (its first input, e.g.
the pre-activation entering a block's final ReLU). :class:`FeatureTaps` registers the hooks once and
hands over what the last forward produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlab.errors import KdlabError, did_you_mean

INPUT_SUFFIX = ":input"


@dataclass
class ModelOutput:
    """What a method sees of a model: logits and the features it asked for, by tap name."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def _split(tap: str) -> tuple[str, bool]:
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


def check_taps(model: nn.Module, taps: Sequence[str], role: str) -> None:
    """Fail before training when a tap names no module, listing the model's tappable layers."""
    modules = dict(model.named_modules())
    for tap in taps:
        name, _ = _split(tap)
        if name not in modules or name == "":
            valid = [n for n in modules if n]
            hint = did_you_mean(name, valid)
            canonical = getattr(model, "feature_taps", None)
            listing = ", ".join(canonical) if canonical else ", ".join(valid[:30])
            raise KdlabError(
                f"{role} ({type(model).__name__}) has no layer '{name}'{'; ' + hint if hint else ''}"
                f" (layers: {listing}; any name from model.named_modules() works)"
            )


class FeatureTaps:
    """Forward hooks on named modules of ``model``; :meth:`collect` returns and clears the features."""

    def __init__(self, model: nn.Module, taps: Sequence[str], role: str = "model") -> None:
        check_taps(model, taps, role)
        self.taps = tuple(taps)
        self._features: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for tap in self.taps:
            name, wants_input = _split(tap)
            self._handles.append(modules[name].register_forward_hook(self._hook(tap, wants_input)))

    def _hook(self, tap: str, wants_input: bool):
        def store(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._features[tap] = inputs[0] if wants_input else output

        return store

    def collect(self) -> dict[str, torch.Tensor]:
        features, self._features = self._features, {}
        missing = [t for t in self.taps if t not in features]
        if missing:
            raise KdlabError(f"layers {missing} did not run in the forward pass, so they cannot be tapped")
        return features

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def tapped_forward(model: nn.Module, taps: FeatureTaps | None, inputs: torch.Tensor) -> ModelOutput:
    """Run ``model`` and pair its logits with the tapped features."""
    logits = model(inputs)
    return ModelOutput(logits, taps.collect() if taps is not None else {})
