"""What the step benchmarks time: one training step of a scheme, without Lightning's loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pair:
    """A teacher -> student experiment, the overrides that make it runnable here, its steps per round."""

    experiment: str
    overrides: tuple[str, ...]
    steps: int


def one_step(system: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """Seconds for every loss term, the weighted sum, backward and the optimiser step."""
    started = time.perf_counter()
    terms = system.loss_terms(batch)
    loss = sum(system.term_weight(name) * term for name, term in terms.items())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started
