"""Run directories: ``<runs_dir>/<group>/<config-hash>/`` with config, checkpoints, metrics, logs.

A run is *finished* when ``metrics.json`` exists: it is written atomically, last. An identical
config maps to the same folder, so a finished run is reused and an unfinished one resumes from
``checkpoints/last.ckpt``. A file lock keeps two processes (a sweep's parallel cells sharing one
teacher) from training the same run twice: the second waits, then reuses.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock

from kdlab.config import config_hash, to_yaml
from kdlab.errors import CheckpointError, ConfigError
from kdlab.files import atomic_write_json, atomic_write_text, restore_replaced_folder

TEACHER_GROUP = "teachers"


@dataclass(frozen=True)
class Run:
    """One run folder; ``spec`` is the exact (hashed) config that produced it."""

    dir: Path
    spec: dict[str, Any]

    @classmethod
    def for_spec(cls, runs_dir: str | Path, group: str, spec: dict[str, Any]) -> Run:
        return cls(Path(runs_dir) / group / config_hash(spec), spec)

    @property
    def hash(self) -> str:
        return self.dir.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    @property
    def model_path(self) -> Path:
        """The trained model alone (no optimiser, no scheme parts): what students load and export."""
        return self.dir / "model.pt"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def status_path(self) -> Path:
        return self.dir / "status.json"

    def is_finished(self) -> bool:
        return self.metrics_path.exists()

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_path.read_text())

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text()) if self.status_path.exists() else {"state": "new"}

    def lock(self) -> FileLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / ".lock"))

    def prepare(self) -> None:
        """Create the folder and write the resolved config (same content on every attempt)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", to_yaml(self.spec))

    def set_status(self, state: str, **info: Any) -> None:
        record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname()}
        record["pid"] = os.getpid()
        record.update(info)
        atomic_write_json(self.status_path, record)

    def finish(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.metrics_path, metrics)
        self.set_status("done")

    def resumable_checkpoint(self) -> tuple[Path, int] | None:
        """The last checkpoint to resume from and its epoch, checked readable (else CheckpointError)."""
        restore_replaced_folder(self.last_checkpoint)  # a kill mid-swap of a sharded checkpoint
        if not self.last_checkpoint.exists():
            return None
        return self.last_checkpoint, int(check_checkpoint(self.last_checkpoint).get("epoch", 0))


def read_run_spec(run_dir: Path) -> dict[str, Any]:
    """A run folder's resolved config (what ``kdlab cache``, ``export`` and ``card`` start from),
    or a one-line error saying why ``run_dir`` is not a run folder."""
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist")
    config = run_dir / "config.yaml"
    if not config.exists():
        raise ConfigError(f"{run_dir} is not a kdlab run folder (no config.yaml)")
    return yaml.safe_load(config.read_text())


# A sharded checkpoint (FSDP2, DeepSpeed) is a folder of per-rank files; this one holds the
# trainer's progress (epoch, loops), as Lightning's ModelParallelStrategy writes it.
SHARDED_METADATA = "meta.pt"


def check_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on CPU (a sharded one's metadata) or fail with one line naming the file
    and what is wrong."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = path / SHARDED_METADATA
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - every unpickling failure means "corrupt" to the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"corrupt checkpoint {path}: {reason}; delete it to start this run from scratch"
        ) from None
