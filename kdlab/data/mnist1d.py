"""MNIST-1D (Greydanus & Kobak): generated procedurally, offline, deterministic by its seed.

Generation takes seconds, so the arrays are cached on disk (written atomically) keyed by every
generation argument; a second run, or a parallel one, reads the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from kdlab.config import config_hash
from kdlab.data.base import Batch, ClassificationDataModule
from kdlab.data.registry import register_dataset
from kdlab.data.signal_augment import SignalAugment
from kdlab.files import atomic_write_bytes, cache_dir

SIGNAL_LENGTH = 40


def mnist1d_arrays(num_samples: int = 5000, dataset_seed: int = 42, shuffle_seq: bool = False) -> dict[str, np.ndarray]:
    """The dataset as arrays ``x, y, x_test, y_test`` (80/20 split, like the reference)."""
    args = {
        "num_samples": num_samples,
        "dataset_seed": dataset_seed,
        "shuffle_seq": shuffle_seq,
        "version": 1,
    }
    path = cache_dir() / "mnist1d" / f"{config_hash(args)}.npz"
    if path.exists():
        with np.load(path) as stored:
            return {key: stored[key] for key in ("x", "y", "x_test", "y_test")}
    arrays = _generate(num_samples, dataset_seed, shuffle_seq)
    _store(path, arrays)
    return arrays


def _generate(num_samples: int, dataset_seed: int, shuffle_seq: bool) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.shuffle_seq = num_samples, dataset_seed, shuffle_seq
    # make_dataset seeds numpy's and Python's global generators; keep the caller's streams intact.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": data["x"].astype(np.float32),
        "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32),
        "y_test": data["y_test"].astype(np.int64),
    }


def _store(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


@register_dataset("mnist1d", "MNIST-1D: 40-sample 1-D digits, 4000 train / 1000 test, generated offline")
class MNIST1DDataModule(ClassificationDataModule):
    """MNIST-1D signals ``[40]``, 10 classes; ``shuffle_seq`` is the paper's shuffled variant.

    With ``augment`` (the default) training batches are shifted, scaled and noised on their
    device (see signal_augment.py); the paper trained without (``data.augment=false``).
    """

    num_classes = 10
    input_shape = (SIGNAL_LENGTH,)

    def __init__(
        self,
        *,
        num_samples: int = 5000,
        dataset_seed: int = 42,
        shuffle_seq: bool = False,
        max_shift: int = 4,
        scale: float = 0.2,
        noise_std: float = 0.1,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.num_samples = num_samples
        self.dataset_seed = dataset_seed
        self.shuffle_seq = shuffle_seq
        self.signal_augment = SignalAugment(max_shift, scale, noise_std)

    def augment_batch(self, batch: Batch) -> Batch:
        return {**batch, "input": self.signal_augment(batch["input"])}

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        arrays = mnist1d_arrays(self.num_samples, self.dataset_seed, self.shuffle_seq)
        train = TensorDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
        test = TensorDataset(torch.from_numpy(arrays["x_test"]), torch.from_numpy(arrays["y_test"]))
        return train, train, test
