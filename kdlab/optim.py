"""Optimisers and per-epoch learning-rate schedules named in :class:`TrainConfig`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdlab.config import OptimizerConfig, ScheduleConfig
from kdlab.registry import Registry
from kdlab.sam import wrap_sam

OPTIMIZERS: Registry[Callable[[Iterable[torch.nn.Parameter], OptimizerConfig], torch.optim.Optimizer]] = Registry(
    "optimizer"
)
SCHEDULES: Registry[Callable[[ScheduleConfig, int], Callable[[int], float]]] = Registry("schedule")


@OPTIMIZERS.register("sgd", "SGD with momentum (the CIFAR KD papers' recipe)")
def _sgd(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
    )


@OPTIMIZERS.register("adam", "Adam (L2 weight decay)")
def _adam(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw", "AdamW (decoupled weight decay)")
def _adamw(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@SCHEDULES.register("multistep", "multiply by gamma at each milestone epoch")
def _multistep(cfg: ScheduleConfig, epochs: int) -> Callable[[int], float]:
    return lambda epoch: cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("cosine", "cosine decay to zero over the training epochs")
def _cosine(cfg: ScheduleConfig, epochs: int) -> Callable[[int], float]:
    span = max(1, epochs - cfg.warmup_epochs)
    return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - cfg.warmup_epochs) / span)))


@SCHEDULES.register("constant", "constant learning rate")
def _constant(cfg: ScheduleConfig, epochs: int) -> Callable[[int], float]:
    return lambda epoch: 1.0


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, model: torch.nn.Module | None = None
) -> torch.optim.Optimizer:
    """The named optimiser, wrapped in SAM/ASAM when ``cfg.sam`` asks (``model``: whose BatchNorm
    statistics SAM's second forward pass must not move)."""
    base = OPTIMIZERS.get(cfg.name)(params, cfg)
    return wrap_sam(base, cfg.sam, cfg.sam_rho, cfg.asam_eta, model)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int) -> LambdaLR:
    """Per-epoch multiplier of the base LR, after an optional linear warm-up."""
    decay = SCHEDULES.get(cfg.name)(cfg, epochs)

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / cfg.warmup_epochs
        return decay(epoch)

    return LambdaLR(optimizer, factor)


def build_step_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int, steps_per_epoch: int
) -> LambdaLR:
    """The same schedule, stepped every optimiser step at fractional epochs (language models train
    for few epochs of many steps: a per-epoch cosine over one epoch would never decay)."""
    decay = SCHEDULES.get(cfg.name)(cfg, epochs)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(step / steps_per_epoch)

    return LambdaLR(optimizer, factor)
