"""Fit and test one system in one run folder with Lightning: loggers, checkpoints, resume."""

from __future__ import annotations

import copy
import ctypes
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar
from lightning.pytorch.loggers import Logger

from kdlab.callbacks import AtomicCheckpoint, BestEpochTest, EpochSeed
from kdlab.config import RuntimeConfig, TrainConfig
from kdlab.data.base import ClassificationDataModule
from kdlab.distributed import (
    build_strategy,
    devices_and_nodes,
    full_state_dict,
    is_global_zero,
    strategy_name,
    wraps_model,
)
from kdlab.loggers import make_loggers
from kdlab.plots import training_curves
from kdlab.runs import Run

# The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Lightning probes for Slurm (even when resolving a checkpoint path) and then hints at srun on any
# machine that has it installed; kdlab reads srun job steps itself (kdlab.distributed.under_srun).
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
# Lightning 2.6's own use of a torch API that torch 2.9+ deprecates; nothing kdlab can change.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# Evaluation metrics are torchmetrics objects that sync across ranks themselves before logging.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


def _count_gpus_without_nvml_where_it_is_missing() -> None:
    """Importing Lightning makes torch count GPUs through NVML (fork-safe) at every
    ``cuda.is_available()``, and torch loads NVML anew at each call: Adam checks every step, 0.1 ms
    (2-3 % of an MNIST-1D step). Where NVML does not load there is no NVIDIA driver, torch already
    falls back to its plain count, and that count is cached: ask for it directly."""
    if sys.platform != "linux" or os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # the library torch's NVML count opens
    except OSError:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"


_count_gpus_without_nvml_where_it_is_missing()


def _attempt_number(run: Run) -> int:
    """Each (re)start logs to its own CSV folder, so a resume never deletes earlier logs."""
    logs = run.dir / "logs"
    return 1 + (sum(1 for p in logs.glob("attempt-*") if p.is_dir()) if logs.exists() else 0)


def run_callbacks(run: Run, seed: int) -> list[Callback]:
    """The callbacks every run has: the epoch checkpoint and per-epoch reseeding."""
    return [
        # No monitor and top-1: "last.ckpt" is rewritten (atomically, sharded ones too) every epoch.
        AtomicCheckpoint(
            dirpath=run.checkpoint_dir, filename="last", save_top_k=1, every_n_epochs=1, enable_version_counter=False
        ),
        EpochSeed(seed),
    ]


def progress_bar(console_kwargs: dict[str, Any] | None = None) -> RichProgressBar:
    """The bar a run shows at a terminal (``console_kwargs``: where Rich draws it). It redraws 10
    times a second, not Lightning's 100: a redraw holds the GIL for milliseconds, which had made a
    2 ms MNIST-1D step a quarter slower (bench/overhead.py); 10 is what the eye follows."""
    return RichProgressBar(refresh_rate=10, leave=True, console_kwargs=console_kwargs)


def make_trainer(
    train: TrainConfig,
    runtime: RuntimeConfig,
    root: Path,
    loggers: list[Logger],
    callbacks: list[Callback],
    validate: bool,
) -> L.Trainer:
    """The Trainer of every run (one place, so benchmarks time the loop users get); it shows a
    progress bar exactly when ``callbacks`` holds one."""
    devices, nodes = devices_and_nodes(runtime)
    return L.Trainer(
        max_epochs=train.epochs,
        accelerator=runtime.accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=build_strategy(runtime),
        # BatchNorm statistics over the global batch, as on one process (DDP; the sharding
        # strategies keep per-rank statistics).
        sync_batchnorm=strategy_name(runtime) == "ddp" and devices * nodes > 1,
        use_distributed_sampler=False,  # the data module shards by rank itself (kdlab/data/base.py)
        precision=train.precision,  # type: ignore[arg-type]
        gradient_clip_val=train.gradient_clip_val,
        logger=loggers or False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        log_every_n_steps=runtime.log_every_n_steps,
        default_root_dir=str(root),
        deterministic=runtime.deterministic,
    )


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
    """Train (resuming from ``last.ckpt`` if present), then test; returns metrics and loggers.

    On several processes every rank calls this; only rank 0 logs and writes files. Under a
    strategy that shards or wraps the modules, a copy of ``system`` trains and the gathered full
    state is loaded back into ``system`` on rank 0, so the caller's models stay plain modules."""
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    datamodule.use_augmentation(train.augment)
    resume = run.resumable_checkpoint()
    attempt = _attempt_number(run)
    writer = is_global_zero(runtime)
    loggers = make_loggers(run.dir, runtime, name, job_type, run.spec, attempt) if writer else []
    callbacks = [*(callbacks or []), *run_callbacks(run, seed)]
    best_epoch = BestEpochTest() if train.test_every_epoch and test else None
    if best_epoch is not None:
        callbacks.append(best_epoch)
    if runtime.progress and sys.stdout.isatty():  # a bar in a log file is just noise
        callbacks.append(progress_bar())
    trainer = make_trainer(train, runtime, run.dir, loggers, callbacks, datamodule.has_validation)
    L.seed_everything(seed, workers=True, verbose=False)
    trained = copy.deepcopy(system) if wraps_model(runtime) else system
    started = time.perf_counter()
    trainer.fit(trained, datamodule=datamodule, ckpt_path=str(resume[0]) if resume else None)
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not metrics and datamodule.has_validation:  # resumed after the last epoch: validation did not run
        metrics = {k: float(v) for k, v in trainer.validate(trained, datamodule=datamodule, verbose=False)[0].items()}
    if best_epoch is not None:
        metrics.update(best_epoch.final_metrics())
    if test:
        metrics.update({k: float(v) for k, v in trainer.test(trained, datamodule=datamodule, verbose=False)[0].items()})
    datamodule.trainer = None  # detached: calibration and reports after training see whole splits
    if trained is not system:
        state = full_state_dict(trainer)  # collective: every rank takes part, rank 0 receives it
        if writer:
            system.load_state_dict(state)
    metrics["epochs"] = trainer.current_epoch
    metrics["train_seconds_this_attempt"] = round(train_seconds, 3)
    metrics["attempts"] = attempt
    metrics["resumed_from_epoch"] = resume[1] if resume else None
    if writer:
        training_curves(sorted((run.dir / "logs").glob("attempt-*/metrics.csv")), run.dir / "curves.png", title=name)
    return metrics, loggers
