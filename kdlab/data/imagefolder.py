"""Any class-per-folder image dataset (ImageNet layout): ``root/train/<class>/*`` and ``root/val``
(or ``root/test``) with the same class folders.

The class list is read from the folders at construction, because kdlab builds the model from
``num_classes`` before any data is loaded. Transforms come from timm's factory (the ImageNet
recipe: random-resized crop and flip for training; resize to ``image_size / 0.875`` and center crop
for evaluation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from kdlab.data.base import ClassificationDataModule, TransformedDataset
from kdlab.data.randaugment import randaugment as check_randaugment
from kdlab.data.registry import register_dataset
from kdlab.errors import ConfigError, DataNotFoundError

EVAL_SPLITS = ("val", "test")
CROP_PCT = 0.875


@register_dataset("imagefolder", "class-per-folder images under data.root/{train,val|test} (ImageNet layout)")
class ImageFolderDataModule(ClassificationDataModule):
    """Folder-per-class images; ``val`` is the test split when both ``val`` and ``test`` exist."""

    def __init__(
        self,
        *,
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        randaugment: str | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        if image_size < 1:
            raise ConfigError(f"dataset 'imagefolder': image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.mean = _channels(mean, "mean")
        self.std = _channels(std, "std")
        # timm's RandAugment in its training transform (only with data.augment), e.g. "rand-m9-mstd0.5".
        if randaugment:
            check_randaugment(randaugment, image_size, self.mean, "imagefolder")
        self.randaugment = randaugment or None
        self.train_dir, self.eval_dir = self._split_dirs()
        self.classes = self._classes()
        self.num_classes = len(self.classes)
        self.input_shape = (3, image_size, image_size)

    def _split_dirs(self) -> tuple[Path, Path]:
        if self.root is None:
            raise ConfigError("dataset 'imagefolder' needs data.root: the folder holding train/ and val/ (or test/)")
        root = Path(self.root).expanduser()
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        eval_dirs = [root / name for name in EVAL_SPLITS if (root / name).is_dir()]
        if "train" not in found or not eval_dirs:
            listing = ", ".join(found) if found else ("nothing" if root.is_dir() else "no such folder")
            raise DataNotFoundError(
                f"dataset 'imagefolder': {root} must hold train/ and val/ (or test/); found: {listing}"
            )
        return root / "train", eval_dirs[0]

    def _classes(self) -> list[str]:
        """Class folder names, identical in both splits (else the labels would not mean the same)."""
        train, evaluation = _class_folders(self.train_dir), _class_folders(self.eval_dir)
        if train != evaluation:
            only_train = sorted(set(train) - set(evaluation)) or "none"
            only_eval = sorted(set(evaluation) - set(train)) or "none"
            raise ConfigError(
                f"dataset 'imagefolder': class folders differ between {self.train_dir} and {self.eval_dir} "
                f"(only in train: {only_train}; only in {self.eval_dir.name}: {only_eval})"
            )
        return train

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        common = {
            "input_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": "bilinear",
        }
        plain = create_transform(is_training=False, crop_pct=CROP_PCT, **common)
        # timm adds colour jitter unless told not to; the recipe here is crop and flip only.
        augmented = create_transform(is_training=True, color_jitter=None, auto_augment=self.randaugment, **common)
        try:
            train = ImageFolder(str(self.train_dir))
            test = ImageFolder(str(self.eval_dir), transform=plain)
        except FileNotFoundError as error:  # a class folder without any image
            raise ConfigError(f"dataset 'imagefolder': {error}") from None
        return (
            TransformedDataset(train, augmented if self.augment else plain),
            TransformedDataset(train, plain),
            test,
        )


def _class_folders(folder: Path) -> list[str]:
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as error:  # no class folder at all
        raise ConfigError(f"dataset 'imagefolder': {error}") from None


def _channels(values: Sequence[float], what: str) -> tuple[float, float, float]:
    """Three per-channel floats (YAML gives a list)."""
    try:
        channels = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        channels = ()
    if len(channels) != 3:
        raise ConfigError(f"dataset 'imagefolder': {what} must be 3 numbers (R, G, B), got {values!r}")
    return channels[0], channels[1], channels[2]
