"""Post-hoc calibration of a trained teacher on held-out logits (Guo et al., ICML 2017).

Temperature scaling divides the logits by one scalar ``T`` fitted to minimise held-out NLL; it
never changes the argmax, so accuracy is untouched while over- or under-confidence is corrected.
Vector scaling (a scale and bias per class) and Platt scaling (its multi-class form, a full linear
map of the logits) can also fix class-specific miscalibration, and may change the argmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from kdlab.metrics import evaluate_logits
from kdlab.registry import Registry

CALIBRATORS: Registry[type[Calibrator]] = Registry("calibration method")


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


class Calibrator(nn.Module):
    """A post-hoc map of logits to calibrated logits, fitted by NLL on held-out logits."""

    name: str = ""

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> Calibrator:
        """Minimise held-out NLL of ``self(logits)`` over the calibrator's parameters, in float64
        with L-BFGS (a few hundred parameters at most: the full-batch optimum, quickly)."""
        self.double()
        logits64 = logits.detach().double()
        optimizer = torch.optim.LBFGS(list(self.parameters()), lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(self(logits64), targets) + self.penalty()
            loss.backward()
            return loss

        optimizer.step(closure)
        return self.requires_grad_(False)

    def penalty(self) -> torch.Tensor | float:
        """Regularisation added to the NLL while fitting (none by default)."""
        return 0.0

    def summary(self) -> dict[str, object]:
        """The fitted parameters, for calibration.json."""
        return {name: value.tolist() for name, value in self.state_dict().items()}


@CALIBRATORS.register("temperature", "temperature scaling: one scalar T fitted by NLL (never changes the argmax)")
class TemperatureScaling(Calibrator):
    """Guo et al. (2017): ``z / T``; optimised over ``log T`` so ``T`` stays positive."""

    name = "temperature"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.log_temperature.exp().to(logits.dtype)

    def summary(self) -> dict[str, object]:
        return {"temperature": self.temperature}


@CALIBRATORS.register("vector", "vector scaling: a scale and a bias per class (Guo et al. 2017)")
class VectorScaling(Calibrator):
    """``z * w + b`` with ``w, b`` per class: fixes class-specific over- or under-confidence."""

    name = "vector"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scale.to(logits.dtype) + self.bias.to(logits.dtype)


@CALIBRATORS.register("platt", "Platt scaling, multi-class: a full linear map W z + b (matrix scaling, Guo et al.)")
class MatrixScaling(Calibrator):
    """Platt's logistic calibration extended to K classes: ``W z + b`` (Guo et al. 2017's matrix
    scaling), starting from the identity. Its K^2 + K parameters overfit a small held-out split
    unfitted, so the off-diagonal weights and the biases carry an L2 penalty (Kull et al., NeurIPS
    2019, "ODIR"), ``regularization`` times their mean square."""

    name = "platt"

    def __init__(self, num_classes: int, regularization: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.regularization = regularization

    def penalty(self) -> torch.Tensor:
        off_diagonal = self.weight - torch.diag(torch.diagonal(self.weight))
        count = self.weight.shape[0]
        return self.regularization * (off_diagonal.pow(2).sum() / (count * (count - 1)) + self.bias.pow(2).mean())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits @ self.weight.to(logits.dtype).T + self.bias.to(logits.dtype)


def fit_calibrator(method: str, logits: torch.Tensor, targets: torch.Tensor) -> Calibrator:
    """Fit the registered calibration ``method`` on held-out logits."""
    return CALIBRATORS.get(method)(logits.shape[-1]).fit(logits, targets)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> float:
    """The ``T > 0`` minimising ``NLL(logits / T)``."""
    calibrator = TemperatureScaling(logits.shape[-1]).fit(logits, targets, max_iter)
    assert isinstance(calibrator, TemperatureScaling)
    return calibrator.temperature


def calibration_report(
    logits: torch.Tensor, targets: torch.Tensor, calibrator: Calibrator | float, bins: int = 15
) -> dict[str, dict[str, float]]:
    """Top-1, NLL, ECE, MCE and Brier score before and after calibration (a calibrator, or a
    temperature to divide by)."""
    with torch.no_grad():
        after = calibrator(logits.double()) if isinstance(calibrator, nn.Module) else logits / calibrator
    return {"before": evaluate_logits(logits, targets, bins), "after": evaluate_logits(after, targets, bins)}
