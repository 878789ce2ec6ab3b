"""Dataset registry: name -> LightningDataModule class, built from a :class:`DataConfig`."""

from __future__ import annotations

from collections.abc import Callable

from kdlab.config import DataConfig
from kdlab.data.base import ClassificationDataModule
from kdlab.registry import Registry
from kdlab.signature import check_kwargs

DATASETS: Registry[type[ClassificationDataModule]] = Registry("dataset")

_COMMON = ("batch_size", "eval_batch_size", "num_workers", "val_fraction", "split_seed", "augment", "root")


def register_dataset(
    name: str, description: str
) -> Callable[[type[ClassificationDataModule]], type[ClassificationDataModule]]:
    return DATASETS.register(name, description)


def create_datamodule(config: DataConfig, seed: int = 0) -> ClassificationDataModule:
    """Instantiate the configured data module (shuffled by the run's ``seed``); its own options
    come from ``data.kwargs``."""
    cls = DATASETS.get(config.name)
    own = check_kwargs(cls, config.kwargs, f"dataset '{config.name}'", reserved=(*_COMMON, "shuffle_seed"))
    common = {key: getattr(config, key) for key in _COMMON}
    return cls(**common, **own, shuffle_seed=seed)
