"""Batch augmentation for 1-D signals: random shift, amplitude scale and additive noise.

It runs on whole batches after they reach the device (Lightning's ``on_after_batch_transfer``),
so it costs one vectorised op per batch, and teacher and student see the same augmented view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SignalAugment:
    """Shift by up to ``max_shift`` samples (zero fill), scale by ``1 ± scale``, add N(0, noise_std)."""

    max_shift: int = 4
    scale: float = 0.2
    noise_std: float = 0.1

    def __call__(self, signals: torch.Tensor) -> torch.Tensor:
        batch, length = signals.shape
        device = signals.device
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (batch, 1), device=device)
        source = torch.arange(length, device=device)[None, :] - shifts
        inside = (source >= 0) & (source < length)
        shifted = torch.where(inside, signals.gather(1, source.clamp(0, length - 1)), 0.0)
        gain = 1.0 + self.scale * (2.0 * torch.rand(batch, 1, device=device) - 1.0)
        return shifted * gain + self.noise_std * torch.randn_like(shifted)
