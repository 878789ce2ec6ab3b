"""Does the exported file compute what the PyTorch student computes? Top-1 agreement on a split."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdlab.deploy.formats import Runner


@dataclass(frozen=True)
class Parity:
    """One exported file against the PyTorch model on ``samples`` samples of one split."""

    samples: int
    agreement: float  # % of samples where the exported file's argmax equals PyTorch's
    max_abs_diff: float  # largest |logit difference| over every sample and class
    reference_top1: float  # % correct, PyTorch model
    exported_top1: float  # % correct, exported file

    @property
    def top1_drop(self) -> float:
        """Accuracy points lost by the export (int8 rounding); about 0 for a float export."""
        return self.reference_top1 - self.exported_top1

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "top1_drop": self.top1_drop}


@torch.inference_mode()
def check_parity(reference: nn.Module, exported: Runner, loader: DataLoader, input_key: str = "input") -> Parity:
    """Both models over every batch of ``loader``; nothing is sampled or skipped."""
    reference.eval()
    samples = agree = ref_correct = exp_correct = 0
    max_diff = 0.0
    for batch in loader:
        inputs, targets = batch[input_key], batch["target"]
        expected = reference(inputs).float()
        got = exported(inputs).float()
        if got.shape != expected.shape:
            raise ValueError(f"exported model returned shape {list(got.shape)}, PyTorch {list(expected.shape)}")
        max_diff = max(max_diff, (got - expected).abs().max().item())
        agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        ref_correct += (expected.argmax(-1) == targets).sum().item()
        exp_correct += (got.argmax(-1) == targets).sum().item()
        samples += len(targets)
    if samples == 0:
        raise ValueError("the parity split is empty")
    percent = 100.0 / samples
    return Parity(samples, agree * percent, max_diff, ref_correct * percent, exp_correct * percent)
