"""Post-hoc calibration of a trained teacher on held-out logits (Guo et al., ICML 2017).

Temperature scaling divides the logits by one scalar ``T`` fitted to minimise held-out NLL; it
never changes the argmax, so accuracy is untouched while over- or under-confidence is corrected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdlab.metrics import evaluate_logits
from kdlab.registry import Registry

CALIBRATORS: Registry[Callable[[torch.Tensor, torch.Tensor], float]] = Registry("calibration method")


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu", input_key: str = "input"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and targets of ``loader`` with ``model`` in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for batch in loader:
        logits.append(model(batch[input_key].to(device)).float().cpu())
        targets.append(batch["target"])
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


@CALIBRATORS.register("temperature", "temperature scaling: one scalar T fitted by NLL on the held-out split")
def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The ``T > 0`` minimising ``NLL(logits / T)``; optimised over ``log T`` in float64 with L-BFGS."""
    logits64 = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits64 / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_report(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, bins: int = 15
) -> dict[str, dict[str, float]]:
    """Top-1, NLL and ECE before and after dividing the logits by ``temperature``."""
    return {
        "before": evaluate_logits(logits, targets, bins),
        "after": evaluate_logits(logits / temperature, targets, bins),
    }
