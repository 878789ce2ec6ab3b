"""Data modules: every dataset yields ``{"input", "target", "index"}`` batches (see base.py)."""

from kdlab.data import (  # noqa: F401  (registers)
    cifar,
    imagefolder,
    mnist1d,
    paired,
    synthetic,
)
from kdlab.data.base import Batch, ClassificationDataModule, DataInfo
from kdlab.data.registry import DATASETS, create_datamodule, register_dataset

__all__ = ["DATASETS", "Batch", "ClassificationDataModule", "DataInfo", "create_datamodule", "register_dataset"]
