"""Checkpoints are swapped in whole: a save goes beside its path first, and a kill between moving
the old folder aside and moving the new one in leaves the old one to resume from."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from kdlab.callbacks import AtomicCheckpoint

from kdlab.files import replace_folder, restore_replaced_folder
from kdlab.runs import SHARDED_METADATA, Run


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_every_epoch_replaces_last_ckpt_and_leaves_no_partial(tmp_path: Path) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    callback = AtomicCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, enable_version_counter=False)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(_Tiny(), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 1
    assert callback.best_model_path == str(tmp_path / "last.ckpt")


def test_a_kill_mid_swap_resumes_from_the_previous_checkpoint(tmp_path: Path) -> None:
    run = Run(tmp_path / "run", {})
    last = run.last_checkpoint
    last.mkdir(parents=True)
    torch.save({"epoch": 3}, last / SHARDED_METADATA)
    new = last.with_name("last.ckpt.partial")
    new.mkdir()
    torch.save({"epoch": 4}, new / SHARDED_METADATA)
    replace_folder(new, last)
    assert run.resumable_checkpoint() == (last, 4) and not list(last.parent.glob(".last.ckpt.old-*"))
    # Killed after the old folder was moved aside and before the new one arrived:
    aside = last.with_name(".last.ckpt.old-deadbeef")
    last.rename(aside)
    assert run.resumable_checkpoint() == (last, 4) and not aside.exists()
    restore_replaced_folder(last)  # nothing to do: the checkpoint is there
    assert (last / SHARDED_METADATA).exists()
