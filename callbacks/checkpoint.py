"""Checkpoints that are never seen half-written, including sharded ones.

Under FSDP2 or DeepSpeed, ``last.ckpt`` is a folder of per-rank shards that every epoch rewrites in
place: a kill during that write would leave the previous epoch's metadata beside half-new shards,
and resume would load the mix. Here every save goes to ``last.ckpt.partial`` and, once all ranks
have written, rank 0 swaps it in whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from kdlab.files import replace_folder

PARTIAL_SUFFIX = ".partial"


class AtomicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes beside its path, then renames (a file) or swaps (a folder)."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = filepath + PARTIAL_SUFFIX
        if trainer.is_global_zero and os.path.isdir(partial):  # left by a killed save
            shutil.rmtree(partial)
        trainer.strategy.barrier("kdlab-checkpoint-start")
        super()._save_checkpoint(trainer, partial)
        trainer.strategy.barrier("kdlab-checkpoint-written")
        if trainer.is_global_zero:
            if os.path.isdir(partial):
                replace_folder(Path(partial), Path(filepath))
            else:
                os.replace(partial, filepath)
        trainer.strategy.barrier("kdlab-checkpoint-swapped")
        self._last_checkpoint_saved = filepath
