"""Sharpness-aware minimisation as a wrapper around any registered optimiser.

SAM (Foret et al. 2021, arXiv:2010.01412) steps with the gradient taken at the worst nearby point
``w + e``, ``e = rho * g / ||g||``; ASAM (Kwon et al. 2021, arXiv:2102.11600) makes the
neighbourhood scale-invariant: ``e = rho * T_w^2 g / ||T_w g||`` with ``T_w = |w| + eta``
elementwise. Here ``eta`` is added for every parameter, biases and norm weights too (the authors'
code leaves biases unscaled); one rule is simpler to state and to test.

The wrapper needs the closure Lightning's automatic optimisation passes to ``step``: it calls it
twice (at ``w`` and at ``w + e``). ``param_groups`` and ``state`` are the base optimiser's own
objects, so LR schedulers and checkpoints see one optimiser whose state a plain one could load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from kdlab.config import TrainConfig
from kdlab.errors import ConfigError

# The papers' CIFAR radii (SAM: Foret et al. Table 9's 0.05; ASAM: Kwon et al.'s 0.5 for SGD).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5}


class SAM(torch.optim.Optimizer):
    """Two-pass step: ascend to ``w + e`` with the first gradient, take the second gradient there,
    return to ``w`` and let ``base`` step with it. ``perturbed`` is True during the second pass, so
    the training step can skip logging it; BatchNorm statistics of ``model`` (if given) are put
    back after it, so only the real forward pass moves them."""

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float,
        adaptive: bool = False,
        eta: float = 0.01,
        model: nn.Module | None = None,
    ) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be positive, got {rho}")
        super().__init__([{"params": group["params"]} for group in base.param_groups], {})
        self.base = base
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.model = model
        self.perturbed = False
        self._share()

    def _share(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def _params(self) -> Iterator[torch.Tensor]:
        for group in self.param_groups:
            yield from (p for p in group["params"] if p.grad is not None)

    @torch.no_grad()
    def _perturbation(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, e)`` for every parameter with a gradient."""
        params = list(self._params())
        if not params:
            return []
        scales = [p.abs() + self.eta if self.adaptive else None for p in params]
        scaled = [p.grad if s is None else s * p.grad for p, s in zip(params, scales, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in scaled]))
        factor = self.rho / (norm + 1e-12)
        return [(p, (g if s is None else s * g) * factor) for p, g, s in zip(params, scaled, scales, strict=True)]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(
                "SAM needs a closure (it evaluates the loss twice per step): use Lightning's automatic "
                "optimisation or call optimizer.step(closure)"
            )
        with torch.enable_grad():
            loss = closure()
        perturbation = self._perturbation()
        with torch.no_grad():
            for p, e in perturbation:
                p.add_(e)
        self.zero_grad()  # a parameter the second pass leaves unused then gets no step
        self.perturbed = True
        try:
            with frozen_norm_stats(self.model), torch.enable_grad():
                closure()
        finally:
            self.perturbed = False
            with torch.no_grad():
                for p, e in perturbation:
                    p.sub_(e)
        self.base.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self._share()  # torch replaces param_groups on load

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # Optimizer.__init__ building the placeholder groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)


@contextmanager
def frozen_norm_stats(model: nn.Module | None) -> Iterator[None]:
    """Put every BatchNorm's running statistics (and batch count) back after the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if model else []
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved, strict=True):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


def check_sam(train: TrainConfig, own_step: bool = False) -> None:
    """SAM needs Lightning's closure: not with manual optimisation (``own_step``) nor fp16's
    GradScaler (Lightning then steps without one)."""
    if train.optimizer.sam == "none":
        return
    if own_step:
        raise ConfigError(
            "optimizer.sam is not supported by this scheme: it runs its own (manually optimised) training step"
        )
    if str(train.precision).startswith("16"):
        raise ConfigError(
            f"optimizer.sam does not work with precision '{train.precision}' (its gradient scaler steps "
            "without a closure): use 32-true or bf16-mixed"
        )


def wrap_sam(
    base: torch.optim.Optimizer, variant: str, rho: float | None, eta: float, model: nn.Module | None = None
) -> torch.optim.Optimizer:
    """``base`` unchanged for ``variant="none"``, else wrapped in SAM/ASAM (rho None: paper default)."""
    if variant == "none":
        return base
    if variant not in DEFAULT_RHO:
        raise ConfigError(f"unknown optimizer.sam '{variant}' (valid: none, {', '.join(DEFAULT_RHO)})")
    return SAM(base, DEFAULT_RHO[variant] if rho is None else rho, adaptive=variant == "asam", eta=eta, model=model)
