"""Loggers for a run: CSV always; W&B online when logged in and reachable, else offline files.

W&B must never block or crash a run: the mode is decided up front (no login or no network means
offline), any failure to start it downgrades to CSV-only with a warning, and so does a failure while
logging (the W&B service dying mid-run, a full disk).
"""

from __future__ import annotations

import netrc
import os
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from kdlab.config import RuntimeConfig
from kdlab.errors import ConfigError
from kdlab.wandb_ablation import run_identity, wandb_config

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(setting: str) -> str:
    """Resolve ``auto`` to ``online`` only when there is a login and the server answers."""
    if setting not in WANDB_MODES:
        raise ConfigError(f"runtime.wandb must be one of {', '.join(WANDB_MODES)}, got '{setting}'")
    if setting != "auto":
        return setting
    env_mode = os.environ.get("WANDB_MODE", "")
    if env_mode in ("offline", "disabled", "online"):
        return env_mode
    if env_mode == "dryrun":
        return "offline"
    server = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = server.hostname or "api.wandb.ai"
    port = server.port or (80 if server.scheme == "http" else 443)
    if not _has_login(host) or not _reachable(host, port):
        return "offline"
    return "online"


def _has_login(host: str) -> bool:
    """An API key in the environment, or a netrc entry (``$NETRC`` or ~/.netrc, as wandb reads)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int, timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def make_loggers(
    run_dir: Path, runtime: RuntimeConfig, name: str, job_type: str, config: dict[str, Any], attempt: int
) -> list[Logger]:
    """CSV logger (one folder per attempt) plus, unless disabled, W&B with files in the run folder."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="logs", version=f"attempt-{attempt}")]
    mode = wandb_mode(runtime.wandb)
    if mode == "disabled":
        return loggers
    try:
        import wandb

        job_type, tags = run_identity(config, runtime.runs_dir, job_type)
        experiment = wandb.init(
            name=name,
            project=runtime.wandb_project,
            entity=runtime.wandb_entity,
            group=runtime.wandb_group or name.split("/")[0],
            job_type=job_type,
            tags=list(dict.fromkeys([*tags, *runtime.wandb_tags])),
            dir=str(run_dir),
            id=f"{name.split('/')[0]}-{run_dir.name}"[-64:],  # a resumed run continues its W&B run
            resume="allow",
            mode=mode,
            config=wandb_config(config, runtime.wandb_sweep),
            settings=wandb.Settings(quiet=True, silent=True, console="off", init_timeout=30, disable_git=True),
        )
        loggers.append(GuardedWandbLogger(experiment=experiment))
    except Exception as error:  # noqa: BLE001 - W&B is optional; the run goes on without it
        warnings.warn(f"W&B logging disabled for this run: {error}", stacklevel=2)
    return loggers


class GuardedWandbLogger(WandbLogger):
    """A WandbLogger whose first failure warns and ends W&B logging for the run, not the run itself
    (Lightning lets a logger's exception end ``fit``)."""

    failed = False

    def _guard(self, action: Any, *args: Any) -> None:
        if self.failed:
            return
        try:
            action(*args)
        except Exception as error:  # noqa: BLE001 - W&B is optional; training goes on without it
            self.failed = True
            warnings.warn(f"W&B logging stopped for this run (the CSV log goes on): {error!r}", stacklevel=3)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._guard(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._guard(super().log_hyperparams, params)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard(super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard(super().finalize, status)


def log_summary(loggers: list[Logger], metrics: dict[str, Any]) -> None:
    """Final metrics into each W&B run's summary; then close W&B so its files are complete."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and not getattr(logger, "failed", False):
            try:
                logger.experiment.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
                logger.experiment.finish()
            except Exception as error:  # noqa: BLE001 - a summary is not worth a failed run
                warnings.warn(f"could not write the W&B summary: {error}", stacklevel=2)
