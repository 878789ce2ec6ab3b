"""A frozen teacher: always in eval mode, never trained, never in the optimiser or the checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from kdlab.features import FeatureTaps, ModelOutput, tapped_forward


class FrozenTeacher(nn.Module):
    """Wraps a trained model for distillation.

    It is a submodule of the scheme so that it follows the scheme across devices, but its
    parameters do not require grad, ``train()`` cannot switch it out of eval mode, and the scheme
    leaves it out of its checkpoints (it is saved once, in its own run).
    """

    def __init__(self, model: nn.Module, taps: tuple[str, ...] = (), temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.taps = FeatureTaps(model, taps, role="teacher")
        self.temperature = temperature

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        out = tapped_forward(self.model, self.taps, inputs)
        if self.temperature != 1.0:
            out.logits = out.logits / self.temperature
        return out
