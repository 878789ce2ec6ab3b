"""Cheap per-term loss logging: Lightning's ``self.log`` costs about a millisecond per key per
step on CPU, more than a small model's whole step, so terms are summed as tensors and written to
the loggers every ``log_every_n_steps`` steps and as epoch means."""

from __future__ import annotations

import math

import lightning as L
import torch


class LossLog:
    """Running sums of the named loss terms of one epoch, plus periodic step records.

    The periodic records double as a divergence check: a non-finite term stops the run.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, module: L.LightningModule, terms: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in terms.items():
            value = value.detach() * batch_size
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += batch_size
        step = module.global_step
        if step % module.trainer.log_every_n_steps:
            return
        record = {f"train/{name}_step": float(value.detach()) for name, value in terms.items()}
        bad = {name: value for name, value in record.items() if not math.isfinite(value)}
        if bad:  # a diverged run must fail, not finish with meaningless metrics
            raise FloatingPointError(f"non-finite loss at epoch {module.current_epoch}, step {step}: {bad}")
        record["train/lr"] = module.trainer.optimizers[0].param_groups[0]["lr"]
        record["epoch"] = module.current_epoch
        if module.trainer.is_global_zero:
            for logger in module.loggers:
                logger.log_metrics(record, step=step)
        if "loss" in terms and module.trainer.progress_bar_callback is not None:  # only the bar shows it
            module.log("loss", terms["loss"].detach(), prog_bar=True, logger=False, on_step=True)

    def log_epoch(self, module: L.LightningModule) -> None:
        """Epoch means of every term (synchronised across processes) as ``train/<term>``."""
        if self.count:
            means = {f"train/{name}": total / self.count for name, total in self.sums.items()}
            module.log_dict(means, on_step=False, on_epoch=True, sync_dist=True, prog_bar=False)
        self.sums, self.count = {}, 0
