"""Fit and test one system in one run folder with Lightning: loggers, checkpoints, resume."""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar

from kdlab.callbacks import EpochSeed
from kdlab.config import RuntimeConfig, TrainConfig
from kdlab.data.base import ClassificationDataModule
from kdlab.loggers import make_loggers
from kdlab.plots import training_curves
from kdlab.runs import Run

# The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Lightning 2.6's own use of a torch API that torch 2.9+ deprecates; nothing kdlab can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _attempt_number(run: Run) -> int:
    """Each (re)start logs to its own CSV folder, so a resume never deletes earlier logs."""
    logs = run.dir / "logs"
    return 1 + (sum(1 for p in logs.glob("attempt-*") if p.is_dir()) if logs.exists() else 0)


def fit_and_test(
    system: L.LightningModule,
    datamodule: ClassificationDataModule,
    run: Run,
    train: TrainConfig,
    runtime: RuntimeConfig,
    seed: int,
    name: str,
    job_type: str,
    test: bool = True,
    callbacks: list[Callback] | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """Train (resuming from ``last.ckpt`` if present), then test; returns metrics and loggers."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    datamodule.use_augmentation(train.augment)
    resume = run.resumable_checkpoint()
    attempt = _attempt_number(run)
    loggers = make_loggers(run.dir, runtime, name, job_type, run.spec, attempt)
    callbacks = [
        *(callbacks or []),
        # No monitor and top-1: "last.ckpt" is rewritten (atomically) at the end of every epoch.
        ModelCheckpoint(
            dirpath=run.checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
        ),
        EpochSeed(seed),
    ]
    show_progress = runtime.progress and sys.stdout.isatty()  # a bar in a log file is just noise
    if show_progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        max_epochs=train.epochs,
        accelerator=runtime.accelerator,
        devices=runtime.devices,
        precision=train.precision,  # type: ignore[arg-type]
        gradient_clip_val=train.gradient_clip_val,
        logger=loggers,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=None if datamodule.has_validation else 0,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        log_every_n_steps=runtime.log_every_n_steps,
        default_root_dir=str(run.dir),
        deterministic=runtime.deterministic,
    )
    L.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    trainer.fit(system, datamodule=datamodule, ckpt_path=str(resume[0]) if resume else None)
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not metrics and datamodule.has_validation:  # resumed after the last epoch: validation did not run
        metrics = {k: float(v) for k, v in trainer.validate(system, datamodule=datamodule, verbose=False)[0].items()}
    if test:
        metrics.update({k: float(v) for k, v in trainer.test(system, datamodule=datamodule, verbose=False)[0].items()})
    metrics["epochs"] = trainer.current_epoch
    metrics["train_seconds_this_attempt"] = round(train_seconds, 3)
    metrics["attempts"] = attempt
    metrics["resumed_from_epoch"] = resume[1] if resume else None
    training_curves(sorted((run.dir / "logs").glob("attempt-*/metrics.csv")), run.dir / "curves.png", title=name)
    return metrics, loggers
