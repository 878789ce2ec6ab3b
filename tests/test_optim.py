"""Learning-rate schedules, per epoch (image recipes) and per step (language models)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.config import ScheduleConfig
from kdlab.optim import build_scheduler, build_step_scheduler


def _lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> list[float]:
    optimizer = scheduler.optimizer
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_step_cosine_decays_within_an_epoch_at_fractional_epochs() -> None:
    """Two epochs of 4 steps: step s is at epoch s/4 of 2, lr = (1 + cos(pi * s / 8)) / 2."""
    scheduler = build_step_scheduler(_optimizer(), ScheduleConfig(name="cosine", milestones=[]), 2, 4)
    expected = [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert _lrs(scheduler, 8) == pytest.approx(expected, abs=1e-12)


def test_step_warmup_is_linear_over_the_warmup_epochs_steps() -> None:
    config = ScheduleConfig(name="constant", milestones=[], warmup_epochs=1)
    assert _lrs(build_step_scheduler(_optimizer(), config, 3, 4), 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_step_multistep_counts_milestones_in_epochs() -> None:
    config = ScheduleConfig(name="multistep", milestones=[1], gamma=0.1)
    assert _lrs(build_step_scheduler(_optimizer(), config, 2, 3), 6) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1])


def test_per_epoch_and_per_step_schedules_agree_at_epoch_starts() -> None:
    config = ScheduleConfig(name="cosine", milestones=[])
    per_epoch = _lrs(build_scheduler(_optimizer(), config, 5), 5)
    per_step = _lrs(build_step_scheduler(_optimizer(), config, 5, 3), 15)[::3]
    assert per_step == pytest.approx(per_epoch, abs=1e-12)
