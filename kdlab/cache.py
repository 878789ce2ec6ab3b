"""The soft-label store: a teacher's outputs on the training split, written once, read by students.

Every student of a frozen teacher pays for the teacher's forward pass again, every epoch. A store
holds those outputs on disk, memory-mapped, so a student run with ``teacher.source=cache`` reads
them by sample index and never builds the teacher.

Layout of a store folder::

    manifest.json       what wrote it (teacher run, its model's sha256, data, transform) and
                        every array's shape, dtype and sha256; written last
    logits.npy          [N, C] float16 (or float32): the full logits, for up to a few thousand classes
  or
    topk_values.npy     [N, k] the k largest logits of each sample
    topk_indices.npy    [N, k] their classes
    rest_logsumexp.npy  [N] float32: logsumexp of the other C - k logits, so the missing
                        probability mass is known, not guessed

A store is written into a hidden temporary folder (chunk by chunk, through memory maps, so memory
stays one batch) and renamed into place only after its manifest is complete: a half-written store
is never at the path a student reads. Opening a store re-checks every array against the manifest.

Augmentation: a store holds one output per sample, which is exact only when a sample looks the same
every epoch, so caching is refused for random training transforms (``data.augment=true``). FKD
(Shen & Xing, ECCV 2022) instead records each epoch's crop parameters and replays them; that costs
the store a factor of the epoch count and needs every transform re-written to replay recorded
parameters, which kdlab does not do.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.config import config_hash
from kdlab.errors import ConfigError
from kdlab.files import atomic_write_json, file_sha256, replace_folder

STORE_FORMAT = "kdlab-store/1"
MANIFEST = "manifest.json"
STORE_GROUP = "stores"
# Full logits up to this many classes (fp16: 2 bytes a class a sample); above it, top-k is asked for.
MAX_FULL_CLASSES = 4096
DTYPES = {"float16": np.float16, "float32": np.float32}
FP16_MAX = float(np.finfo(np.float16).max)


def default_store_path(runs_dir: str | Path, teacher_run_hash: str, data: dict[str, Any], top_k: int | None) -> Path:
    """Where ``kdlab cache`` writes, and where a student looks unless ``teacher.store`` names one."""
    key = config_hash({"teacher": teacher_run_hash, "data": data, "top_k": top_k})
    return Path(runs_dir) / STORE_GROUP / key


def open_stored_array(
    folder: Path, name: str, info: dict[str, Any], verify: bool = True, kind: str = "soft-label store"
) -> np.ndarray:
    """Memory-map one array of a store folder, checked against its manifest entry (``info``: shape,
    dtype and, with ``verify``, sha256); a mismatch is a one-line error naming the store and file."""
    path = folder / name
    if not path.exists():
        raise ConfigError(f"{kind} {folder} lacks {name}, which its manifest lists")
    if verify and file_sha256(path) != info["sha256"]:
        raise ConfigError(f"{kind} {folder}: {name} does not match its manifest's sha256 (corrupted)")
    array = np.load(path, mmap_mode="r")
    if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
        raise ConfigError(
            f"{kind} {folder}: {name} is {array.dtype}{list(array.shape)}, the manifest says"
            f" {info['dtype']}{info['shape']}"
        )
    return array


def seal_arrays(folder: Path, arrays: dict[str, np.memmap]) -> dict[str, dict[str, Any]]:
    """Flush and fsync every array file of a store being written, and describe each (shape, dtype,
    sha256) for its manifest: the manifest is written last, so it vouches only for what is on disk."""
    files = {}
    for name, array in arrays.items():
        array.flush()
        with open(folder / name, "rb") as handle:
            os.fsync(handle.fileno())
        files[name] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": file_sha256(folder / name)}
    return files


def read_manifest(path: Path, expected_format: str, what: str, rewrite_hint: str) -> dict[str, Any]:
    """The manifest of a finished store; a missing one means the write was interrupted."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise ConfigError(
            f"{path} is not a finished {what} (no {MANIFEST}; a store gets its manifest last, so an"
            f" interrupted write leaves none): write it again {rewrite_hint}"
        )
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    if manifest.get("format") != expected_format:
        raise ConfigError(f"{path}: store format {manifest.get('format')!r}, expected {expected_format!r}")
    return manifest


class SoftLabelStore:
    """A finished store, opened read-only and memory-mapped; checked against its manifest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, STORE_FORMAT, "soft-label store", "with `kdlab cache`")
        self.arrays = {name: open_stored_array(self.path, name, info) for name, info in self.manifest["files"].items()}
        self.num_samples: int = self.manifest["num_samples"]
        self.num_classes: int = self.manifest["num_classes"]
        self.top_k: int | None = self.manifest["top_k"]

    @property
    def content_hash(self) -> str:
        """Identifies the stored numbers (a student run's spec names the store by it)."""
        return config_hash({name: info["sha256"] for name, info in self.manifest["files"].items()})

    @property
    def bytes_per_sample(self) -> float:
        return sum((self.path / name).stat().st_size for name in self.manifest["files"]) / self.num_samples

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[len(index), C]`` of the training samples at ``index``.

        A top-k store gives the k stored logits exactly and spreads the rest of the probability
        mass evenly over the other classes (each gets ``rest_logsumexp - log(C - k)``): at T = 1
        the softmax is exact on the top k and on the total of the rest.
        """
        rows = index.detach().cpu().numpy()
        if self.top_k is None:
            return torch.from_numpy(np.asarray(self.arrays["logits.npy"][rows], dtype=np.float32)).to(index.device)
        values = torch.from_numpy(np.asarray(self.arrays["topk_values.npy"][rows], dtype=np.float32))
        classes = torch.from_numpy(np.asarray(self.arrays["topk_indices.npy"][rows], dtype=np.int64))
        rest = torch.from_numpy(np.asarray(self.arrays["rest_logsumexp.npy"][rows], dtype=np.float32))
        others = self.num_classes - self.top_k
        fill = rest - math.log(others) if others else torch.full_like(rest, -math.inf)
        dense = fill[:, None].expand(len(rows), self.num_classes).clone()
        return dense.scatter_(1, classes, values).to(index.device)


class StoreWriter:
    """Writes a store chunk by chunk into a temporary folder; :meth:`finish` renames it into place."""

    def __init__(self, path: Path, num_samples: int, num_classes: int, top_k: int | None, dtype: str) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"unknown store dtype '{dtype}' (valid: {', '.join(DTYPES)})")
        if top_k is None and num_classes > MAX_FULL_CLASSES:
            raise ConfigError(
                f"{num_classes} classes: full logits would take {2 * num_classes} bytes a sample;"
                f" give --top-k (e.g. --top-k 64) to store the largest k logits and the rest's mass"
            )
        if top_k is not None and not 1 <= top_k <= num_classes:
            raise ConfigError(f"--top-k must be between 1 and the class count {num_classes}, got {top_k}")
        self.path, self.num_samples, self.num_classes, self.top_k = path, num_samples, num_classes, top_k
        self.dtype = DTYPES[dtype]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
        open_memmap = np.lib.format.open_memmap
        if top_k is None:
            shapes = {"logits.npy": ((num_samples, num_classes), self.dtype)}
        else:
            index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
            shapes = {
                "topk_values.npy": ((num_samples, top_k), self.dtype),
                "topk_indices.npy": ((num_samples, top_k), index_dtype),
                "rest_logsumexp.npy": ((num_samples,), np.float32),
            }
        self.arrays = {
            name: open_memmap(self.tmp / name, "w+", dtype, shape) for name, (shape, dtype) in shapes.items()
        }
        self.written = 0

    def write(self, logits: torch.Tensor) -> None:
        """The logits of the next ``len(logits)`` samples, in index order."""
        start, stop = self.written, self.written + len(logits)
        if stop > self.num_samples:
            raise ValueError(f"store of {self.num_samples} samples got {stop}")
        logits = logits.detach().float().cpu()
        if self.dtype == np.float16 and logits.abs().max().item() > FP16_MAX:
            raise ConfigError(
                f"teacher logits exceed float16's range ({FP16_MAX:g}); write the store with --dtype float32"
            )
        if self.top_k is None:
            self.arrays["logits.npy"][start:stop] = logits.numpy()
        else:
            values, classes = logits.topk(self.top_k, dim=1)
            rest = logits.scatter(1, classes, -math.inf).logsumexp(dim=1)
            self.arrays["topk_values.npy"][start:stop] = values.numpy()
            self.arrays["topk_indices.npy"][start:stop] = classes.numpy()
            self.arrays["rest_logsumexp.npy"][start:stop] = rest.numpy()
        self.written = stop

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Flush, hash, write the manifest, and move the folder to its path (replacing an old store)."""
        if self.written != self.num_samples:
            raise ValueError(f"store got {self.written} of {self.num_samples} samples")
        files = seal_arrays(self.tmp, self.arrays)
        self.arrays.clear()
        manifest = {
            **manifest,
            "format": STORE_FORMAT,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "top_k": self.top_k,
            "files": files,
        }
        atomic_write_json(self.tmp / MANIFEST, manifest)
        replace_folder(self.tmp, self.path)
        return manifest

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_store(
    path: Path,
    batches: Iterable[torch.Tensor],
    num_samples: int,
    num_classes: int,
    manifest: dict[str, Any],
    top_k: int | None = None,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Write logits ``batches`` (in sample order) as a store at ``path``; returns its manifest
    (with the write time and throughput). Any failure leaves no store and no temporary folder."""
    writer = StoreWriter(path, num_samples, num_classes, top_k, dtype)
    started = time.perf_counter()
    try:
        for logits in batches:
            writer.write(logits)
        seconds = time.perf_counter() - started
        manifest = {**manifest, "write_seconds": round(seconds, 3)}
        return writer.finish(manifest)
    except BaseException:
        writer.abort()
        raise
