"""CIFAR-10 and CIFAR-100 from torchvision's python-format files under ``data.root``.

kdlab never downloads: a missing ``data.root`` or missing files fail at construction, and files
that fail torchvision's md5 check fail at setup, each with one line naming the path, before any
training starts. torchvision's own dataset classes read the files, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from kdlab.data.base import ClassificationDataModule, TransformedDataset
from kdlab.data.randaugment import randaugment as randaugment_transform
from kdlab.data.registry import register_dataset
from kdlab.errors import ConfigError, DataNotFoundError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The statistics the CRD code base (and the KD papers that reuse it) normalises CIFAR-100 with.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def expected_files(dataset_class: type[CIFAR10]) -> list[tuple[str, str]]:
    """``(file name, md5)`` of every file torchvision reads for this dataset."""
    files = [(name, md5) for name, md5 in dataset_class.train_list + dataset_class.test_list]
    return [*files, (dataset_class.meta["filename"], dataset_class.meta["md5"])]


class _CIFARDataModule(ClassificationDataModule):
    """Shared CIFAR loading; subclasses name the torchvision class and the normalisation."""

    dataset_class: ClassVar[type[CIFAR10]]
    dataset_name: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    input_shape = (3, 32, 32)

    def __init__(self, *, randaugment: str | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.folder = self._check_files()
        # timm's RandAugment after crop and flip (only with data.augment), e.g. "rand-m9-mstd0.5".
        self.randaugment = randaugment_transform(randaugment, 32, self.mean, self.dataset_name) if randaugment else None

    def _check_files(self) -> Path:
        """The dataset folder, or a ConfigError now rather than a traceback in setup."""
        base_folder = self.dataset_class.base_folder
        if self.root is None:
            raise ConfigError(
                f"dataset '{self.dataset_name}' needs data.root: set it to the folder that holds "
                f"'{base_folder}/' (kdlab never downloads datasets)"
            )
        folder = Path(self.root).expanduser() / base_folder
        if not folder.is_dir():
            raise DataNotFoundError(
                f"dataset '{self.dataset_name}': expected {folder} (the unpacked python version, "
                f"{self.dataset_class.filename}); kdlab never downloads: fetch and unpack it there yourself"
            )
        missing = [name for name, _ in expected_files(self.dataset_class) if not (folder / name).is_file()]
        if missing:
            raise DataNotFoundError(
                f"dataset '{self.dataset_name}': {folder} lacks {', '.join(missing)}; kdlab never downloads: "
                f"unpack a complete {self.dataset_class.filename} there"
            )
        return folder

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        plain = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])
        extra = [self.randaugment] if self.randaugment is not None else []
        augmented = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *extra, plain])
        root = str(self.folder.parent)
        try:
            train = self.dataset_class(root, train=True, download=False)
            test = self.dataset_class(root, train=False, transform=plain, download=False)
        except RuntimeError:
            corrupt = [n for n, md5 in expected_files(self.dataset_class) if not check_integrity(self.folder / n, md5)]
            if not corrupt:
                raise
            raise ConfigError(
                f"dataset '{self.dataset_name}': {', '.join(corrupt)} under {self.folder} fail torchvision's "
                f"md5 check (corrupted or another release?); kdlab never downloads: replace them with "
                f"a fresh copy of {self.dataset_class.filename}"
            ) from None
        return (
            TransformedDataset(train, augmented if self.augment else plain),
            TransformedDataset(train, plain),
            test,
        )


@register_dataset("cifar10", "CIFAR-10: 32x32 RGB, 10 classes, 50000 train / 10000 test (files under data.root)")
class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 with the standard crop-and-flip training augmentation."""

    dataset_class = CIFAR10
    dataset_name = "cifar10"
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    num_classes = 10


@register_dataset(
    "cifar100", "CIFAR-100: 32x32 RGB, 100 fine classes, 50000 train / 10000 test (files under data.root)"
)
class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels) with the standard crop-and-flip training augmentation."""

    dataset_class = CIFAR100
    dataset_name = "cifar100"
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    num_classes = 100
