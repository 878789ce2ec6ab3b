"""Teachers as a scheme sees them: a frozen model, or a soft-label store read by sample index.

Both are always in eval mode, never trained, never in the optimiser or the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.cache import SoftLabelStore
from kdlab.data.base import Batch
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

    def outputs(self, batch: Batch, input_key: str) -> ModelOutput:
        """The teacher's output on a training batch (schemes call this, so a store can stand in)."""
        return self(batch[input_key])  # type: ignore[literal-required]


class StoreLookup(nn.Module):
    """A soft-label store in the place of a teacher model: no parameters, nothing to train."""

    def __init__(self, store: SoftLabelStore) -> None:
        super().__init__()
        self.store = store

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.store.logits(index)


class StoredTeacher(FrozenTeacher):
    """The teacher's stored logits of the batch's samples (``batch["index"]``); it has no
    features, and cannot be called on inputs it has not seen."""

    def __init__(self, lookup: StoreLookup, temperature: float = 1.0) -> None:
        super().__init__(lookup, (), temperature)

    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        raise RuntimeError("a stored teacher is read by sample index, not called on inputs")

    def outputs(self, batch: Batch, input_key: str) -> ModelOutput:
        logits = self.model(batch["index"]).to(batch[input_key].device)  # type: ignore[literal-required]
        return ModelOutput(logits / self.temperature if self.temperature != 1.0 else logits)
