"""Evaluation metrics every run reports: top-1 (%), NLL (nats), ECE (%), via torchmetrics; calibration
reports add MCE (%) and the Brier score."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error


class ClassificationMetrics(nn.Module):
    """Accumulates logits batch by batch; :meth:`compute` gives ``{"top1", "nll", "ece"}``."""

    def __init__(self, num_classes: int, bins: int = 15) -> None:
        super().__init__()
        self.top1 = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=bins, norm="l1")
        self.nll = MeanMetric()

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits = logits.float()
        self.top1.update(logits, target)
        self.ece.update(logits.softmax(-1), target)
        self.nll.update(F.cross_entropy(logits, target, reduction="none"))

    def compute(self) -> dict[str, torch.Tensor]:
        return {"top1": 100 * self.top1.compute(), "nll": self.nll.compute(), "ece": 100 * self.ece.compute()}

    def reset(self) -> None:
        for metric in (self.top1, self.ece, self.nll):
            metric.reset()


def evaluate_logits(logits: torch.Tensor, target: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """The same metrics on a full set of logits at once (used for calibration reports)."""
    num_classes = logits.shape[-1]
    probs = logits.float().softmax(-1)
    one_hot = F.one_hot(target, num_classes).to(probs.dtype)
    return {
        "top1": 100 * multiclass_accuracy(probs, target, num_classes=num_classes, average="micro").item(),
        "nll": F.cross_entropy(logits.float(), target).item(),
        "ece": 100 * multiclass_calibration_error(probs, target, num_classes=num_classes, n_bins=bins).item(),
        # the worst bin's |accuracy - confidence| (Naeini et al. 2015), and the Brier score
        "mce": 100
        * multiclass_calibration_error(probs, target, num_classes=num_classes, n_bins=bins, norm="max").item(),
        "brier": ((probs - one_hot) ** 2).sum(-1).mean().item(),
    }
