"""Random tensors of any shape: for benchmarks and device checks, where only shapes matter.

Inputs are drawn once from a seeded generator (so runs are repeatable) and labels uniformly; no
model can learn anything from them, and no result trained on them means anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from kdlab.data.base import ClassificationDataModule
from kdlab.data.registry import register_dataset
from kdlab.errors import ConfigError


@register_dataset("synthetic", "random inputs and labels of a chosen shape (benchmarks and device checks only)")
class SyntheticDataModule(ClassificationDataModule):
    """``num_samples`` random inputs of ``shape`` (default CIFAR's 3x32x32) with ``classes`` labels."""

    def __init__(
        self,
        *,
        num_samples: int = 1024,
        test_samples: int = 256,
        classes: int = 100,
        shape: list[int] | None = None,
        data_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        shape = list(shape) if shape is not None else [3, 32, 32]
        if num_samples < 1 or test_samples < 1 or classes < 2 or not shape or min(shape) < 1:
            raise ConfigError(
                f"dataset 'synthetic' needs positive sizes and at least 2 classes, got num_samples={num_samples},"
                f" test_samples={test_samples}, classes={classes}, shape={shape}"
            )
        self.num_classes = classes
        self.input_shape = tuple(shape)
        self.sizes = (num_samples, test_samples)
        self.data_seed = data_seed

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        generator = torch.Generator().manual_seed(self.data_seed)
        splits = []
        for size in self.sizes:
            inputs = torch.randn(size, *self.input_shape, generator=generator)
            splits.append(TensorDataset(inputs, torch.randint(0, self.num_classes, (size,), generator=generator)))
        train, test = splits
        return train, train, test
