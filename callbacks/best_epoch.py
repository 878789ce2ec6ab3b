"""Best-epoch test accuracy: the protocol of the CRD and DKD papers' code (RepDistiller,
mdistiller), which test after every epoch and report the best epoch's top-1.

It reads the test split during training, so it is a reporting protocol to match published tables,
not model selection; ``test/top1`` (the last epoch) is reported beside it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback


class BestEpochTest(Callback):
    """After every training epoch, score the student on the test split and keep the best top-1.

    The pass runs in eval mode under ``fork_rng``, so training draws the same random numbers as
    without it (a DataLoader iterator takes its seed from the global generator). The best value
    is part of the checkpoint, so a resumed run reports the best over all its epochs."""

    def __init__(self) -> None:
        self.best_top1 = float("-inf")
        self.best_epoch = -1

    @property
    def state_key(self) -> str:
        return "BestEpochTest"

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: Any = trainer.datamodule  # type: ignore[attr-defined]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        was_training = pl_module.training
        pl_module.eval()
        correct = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for batch in datamodule.test_dataloader():
                # Not strategy.batch_to_device: its hooks would augment (the trainer is training).
                batch = move_data_to_device(batch, pl_module.device)
                logits = pl_module.eval_logits(batch)[""]  # type: ignore[operator]
                correct += (logits.argmax(dim=1) == batch["target"]).sum()
                total += batch["target"].numel()
        pl_module.train(was_training)
        correct = trainer.strategy.reduce(correct, reduce_op="sum")
        total = trainer.strategy.reduce(total, reduce_op="sum")
        top1 = float(100.0 * correct / total)
        if top1 > self.best_top1:
            self.best_top1, self.best_epoch = top1, trainer.current_epoch
        pl_module.log_dict({"test_epoch/top1": top1, "test_epoch/top1_best": self.best_top1}, sync_dist=False)

    def final_metrics(self) -> dict[str, float]:
        """``test/top1_best`` (%) and its epoch (0-based), for the run's metrics."""
        return {"test/top1_best": self.best_top1, "test/top1_best_epoch": float(self.best_epoch)}

    def state_dict(self) -> dict[str, Any]:
        return {"best_top1": self.best_top1, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_top1, self.best_epoch = state_dict["best_top1"], state_dict["best_epoch"]
