"""Paired (cross-modal) data: the teacher sees one modality of a sample, the student another.

Batches extend base.py's: ``{"input": student view, "teacher_input": teacher view, "target", "index",
"labelled"}``. ``labelled[i]`` False means the student must not use that label (the teacher's output
is its only supervision there); the teacher trains on its own view with every label. Which training
samples the student may see labelled is drawn once from ``split_seed`` (a fraction
``student_labels`` of the training split), so it is the same for every training seed. Evaluation
batches (held-out, test, calibration) carry both views and are all labelled.

Both views of a sample always show the same augmented sample: MNIST-1D augments the signal on the
device and derives the spectrogram from the augmented signal; image pairs share one random crop
and flip (in relative coordinates, so views of different resolutions stay aligned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, find_classes
from torchvision.transforms import functional as TF

from kdlab.data.base import Batch, ClassificationDataModule, TransformedDataset, dataset_targets
from kdlab.data.imagefolder import CROP_PCT, EVAL_SPLITS
from kdlab.data.mnist1d import SIGNAL_LENGTH, MNIST1DDataModule
from kdlab.data.registry import register_dataset
from kdlab.data.spectrogram import check_spectrogram_options, signal_spectrogram, spectrogram_shape
from kdlab.errors import ConfigError

# Offsets the labelled-subset draw from the held-out draw, which uses ``split_seed`` itself.
LABEL_SEED_OFFSET = 7_919


class PairedBatch(Batch):
    teacher_input: torch.Tensor
    labelled: torch.Tensor


class Views(NamedTuple):
    """The two views of one sample, as the ``x`` of a paired dataset's ``(x, y)``."""

    student: torch.Tensor
    teacher: torch.Tensor


def labelled_mask(num_samples: int, fraction: float, split_seed: int) -> torch.Tensor:
    """Bool ``[num_samples]``: exactly ``round(fraction * num_samples)`` True, placed by ``split_seed`` only."""
    generator = torch.Generator().manual_seed(split_seed + LABEL_SEED_OFFSET)
    chosen = torch.randperm(num_samples, generator=generator)[: round(fraction * num_samples)]
    mask = torch.zeros(num_samples, dtype=torch.bool)
    mask[chosen] = True
    return mask


class PairedSamples(Dataset):
    """Split an indexed sample whose ``input`` is :class:`Views` into the paired batch keys."""

    def __init__(self, samples: Dataset, labelled: torch.Tensor | None = None) -> None:
        self.samples = samples
        self.labelled = labelled  # None: every sample labelled (evaluation splits)

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    @property
    def targets(self) -> torch.Tensor:
        return dataset_targets(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        views: Views = sample["input"]
        labelled = self.labelled[sample["index"]] if self.labelled is not None else torch.tensor(True)
        return {
            "input": views.student,
            "teacher_input": views.teacher,
            "target": sample["target"],
            "index": sample["index"],
            "labelled": labelled,
        }


class PairedDataModule(ClassificationDataModule):
    """A data module whose ``build_datasets`` yields ``(Views, y)`` samples; adds the paired keys."""

    teacher_input_shape: tuple[int, ...]
    teacher_input_key = "teacher_input"
    student_only_options = ("student_labels",)  # teachers always train on every label

    def __init__(self, *, student_labels: float = 0.0, **common: Any) -> None:
        if not 0.0 <= student_labels <= 1.0:
            raise ConfigError(f"student_labels is a fraction of the training split, in [0, 1]; got {student_labels}")
        super().__init__(**common)
        self.student_labels = student_labels
        self.student_labelled: torch.Tensor | None = None  # by training-split index, after setup()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        assert self.train_set is not None and self.test_set is not None
        self.student_labelled = labelled_mask(len(self.train_set), self.student_labels, self.split_seed)  # type: ignore[arg-type]
        self.train_set = PairedSamples(self.train_set, self.student_labelled)
        self.val_set = PairedSamples(self.val_set) if self.val_set is not None else None
        self.test_set = PairedSamples(self.test_set)


# --- MNIST-1D: signal (teacher) -> spectrogram (student) ----------------------------------------


class PairedTensors(Dataset):
    """``(Views(student[i], teacher[i]), targets[i])`` from precomputed tensors."""

    def __init__(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> None:
        self.student, self.teacher, self.targets = student, teacher, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Views, torch.Tensor]:
        return Views(self.student[index], self.teacher[index]), self.targets[index]


@register_dataset(
    "paired_mnist1d", "MNIST-1D, cross-modal: teacher reads the 40-sample signal, student its spectrogram [1, F, T]"
)
class PairedMNIST1DDataModule(PairedDataModule, MNIST1DDataModule):
    """MNIST-1D with the raw signal ``[40]`` for the teacher and its log-magnitude STFT ``[1, F, T]``
    (F = n_fft // 2 + 1 frequencies by T frames; [1, 9, 21] by default) for the student.

    Data, split and augmentation are those of ``mnist1d``; the spectrogram is precomputed for
    evaluation and, with ``augment``, recomputed on the device from each augmented signal.
    """

    def __init__(
        self,
        *,
        student_labels: float = 0.0,
        spectrogram_n_fft: int = 16,
        spectrogram_hop: int = 2,
        num_samples: int = 5000,
        dataset_seed: int = 42,
        shuffle_seq: bool = False,
        max_shift: int = 4,
        scale: float = 0.2,
        noise_std: float = 0.1,
        **common: Any,
    ) -> None:
        check_spectrogram_options(SIGNAL_LENGTH, spectrogram_n_fft, spectrogram_hop)
        super().__init__(
            student_labels=student_labels,
            num_samples=num_samples,
            dataset_seed=dataset_seed,
            shuffle_seq=shuffle_seq,
            max_shift=max_shift,
            scale=scale,
            noise_std=noise_std,
            **common,
        )
        self.n_fft, self.hop = spectrogram_n_fft, spectrogram_hop
        self.input_shape = spectrogram_shape(SIGNAL_LENGTH, spectrogram_n_fft, spectrogram_hop)
        self.teacher_input_shape = (SIGNAL_LENGTH,)

    def spectrogram(self, signals: torch.Tensor) -> torch.Tensor:
        return signal_spectrogram(signals, self.n_fft, self.hop)

    def augment_batch(self, batch: PairedBatch) -> PairedBatch:  # type: ignore[override]
        signals = self.signal_augment(batch["teacher_input"])
        return {**batch, "teacher_input": signals, "input": self.spectrogram(signals)}

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train, _, test = super().build_datasets()

        def paired(signals: TensorDataset) -> PairedTensors:
            x, y = signals.tensors
            return PairedTensors(self.spectrogram(x), x, y)

        train_pairs = paired(train)  # type: ignore[arg-type]
        return train_pairs, train_pairs, paired(test)  # type: ignore[arg-type]


# --- image folders: one folder tree per modality -------------------------------------------------

DATASET = "dataset 'paired_imagefolder'"
# timm's ImageNet training crop (what `imagefolder` uses), drawn once per pair.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BILINEAR = T.InterpolationMode.BILINEAR


def load_single_channel(path: str) -> Image.Image:
    """A one-channel image as a float (``F``) image in [0, 1]; 16-bit files (most depth maps) keep
    their precision instead of being clipped to 8 bits as an RGB or ``L`` conversion would."""
    with open(path, "rb") as handle, Image.open(handle) as image:
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):
            return Image.fromarray(np.asarray(image, dtype=np.float32) / 65535.0)
        return Image.fromarray(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)


@dataclass(frozen=True)
class Modality:
    """How one modality is read and turned into a tensor: ``[channels, image_size, image_size]``."""

    name: str
    folder: Path
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.image_size, self.image_size

    def load(self, path: str) -> Image.Image:
        return default_loader(path) if self.channels == 3 else load_single_channel(path)

    def crop(self, image: Image.Image, box: tuple[float, float, float, float], flip: bool) -> torch.Tensor:
        """Training view: the crop ``box`` (top, left, height, width as fractions of the image)."""
        width, height = image.size
        top, left = round(box[0] * height), round(box[1] * width)
        size = [self.image_size, self.image_size]
        image = TF.resized_crop(
            image, top, left, max(1, round(box[2] * height)), max(1, round(box[3] * width)), size, BILINEAR
        )
        return self.to_tensor(TF.hflip(image) if flip else image)

    def center(self, image: Image.Image) -> torch.Tensor:
        """Evaluation view: resize to ``image_size / 0.875`` and center-crop, as `imagefolder` does."""
        image = TF.resize(image, math.floor(self.image_size / CROP_PCT), BILINEAR)
        return self.to_tensor(TF.center_crop(image, [self.image_size, self.image_size]))

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(image), list(self.mean), list(self.std))


class PairedImages(Dataset):
    """``((teacher image, student image), class)`` read from matched files."""

    def __init__(self, pairs: list[tuple[str, str]], targets: list[int], teacher: Modality, student: Modality) -> None:
        self.pairs, self.targets = pairs, targets
        self.teacher, self.student = teacher, student

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[tuple[Image.Image, Image.Image], int]:
        teacher_path, student_path = self.pairs[index]
        return (self.teacher.load(teacher_path), self.student.load(student_path)), self.targets[index]


@dataclass(frozen=True)
class PairedImageTransform:
    """Both images of a pair -> :class:`Views`; in training one random crop and flip for both."""

    teacher: Modality
    student: Modality
    train: bool

    def __call__(self, images: tuple[Image.Image, Image.Image]) -> Views:
        teacher_image, student_image = images
        if not self.train:
            return Views(self.student.center(student_image), self.teacher.center(teacher_image))
        top, left, height, width = T.RandomResizedCrop.get_params(teacher_image, list(CROP_SCALE), list(CROP_RATIO))
        full_width, full_height = teacher_image.size
        box = (top / full_height, left / full_width, height / full_height, width / full_width)
        flip = bool(torch.rand(()) < 0.5)
        return Views(self.student.crop(student_image, box, flip), self.teacher.crop(teacher_image, box, flip))


@register_dataset(
    "paired_imagefolder",
    "cross-modal image pairs under data.root/<modality>/{train,val|test}/<class>/, matched by path (rgb -> depth)",
)
class PairedImageFolderDataModule(PairedDataModule):
    """Two `imagefolder` trees under ``root``, one per modality, whose files pair up by relative path
    (the extension may differ: ``rgb/train/cat/0001.jpg`` pairs with ``depth/train/cat/0001.png``).

    ``*_channels`` is 3 (RGB, torchvision's default loader) or 1 (grayscale; 16-bit PNGs keep their
    precision, scaled to [0, 1]). ``*_mean`` / ``*_std`` hold one value per channel or one for all.
    """

    def __init__(
        self,
        *,
        teacher_modality: str = "rgb",
        student_modality: str = "depth",
        student_labels: float = 0.0,
        teacher_channels: int = 3,
        student_channels: int = 1,
        teacher_image_size: int = 224,
        student_image_size: int = 224,
        teacher_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        teacher_std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        student_mean: tuple[float, ...] = (0.5,),
        student_std: tuple[float, ...] = (0.5,),
        **common: Any,
    ) -> None:
        super().__init__(student_labels=student_labels, **common)
        if teacher_modality == student_modality:
            raise ConfigError(f"{DATASET}: teacher and student modality are both '{teacher_modality}'")
        if self.root is None:
            raise ConfigError(f"{DATASET} needs data.root: the folder holding one folder per modality")
        root = Path(self.root).expanduser()
        self.teacher = _modality(
            root, "teacher", teacher_modality, teacher_channels, teacher_image_size, teacher_mean, teacher_std
        )
        self.student = _modality(
            root, "student", student_modality, student_channels, student_image_size, student_mean, student_std
        )
        self.train_split, self.eval_split = "train", self._eval_split()
        self.classes = self._classes()
        self.num_classes = len(self.classes)
        self.input_shape = self.student.shape
        self.teacher_input_shape = self.teacher.shape

    def _eval_split(self) -> str:
        """``val`` (else ``test``) of the teacher's tree; the student's tree must have the same splits."""
        splits = _splits(self.teacher.folder)
        if "train" not in splits or not set(EVAL_SPLITS) & set(splits):
            raise ConfigError(
                f"{DATASET}: {self.teacher.folder} must hold train/ and val/ (or test/); found: {_listing(splits)}"
            )
        evaluation = next(name for name in EVAL_SPLITS if name in splits)
        student_splits = _splits(self.student.folder)
        missing = [name for name in ("train", evaluation) if name not in student_splits]
        if missing:
            raise ConfigError(
                f"{DATASET}: {self.student.folder} lacks {', '.join(s + '/' for s in missing)} that "
                f"{self.teacher.folder} has; found: {_listing(student_splits)}"
            )
        return evaluation

    def _classes(self) -> list[str]:
        """Class folders, identical in every split of both modalities (else labels would differ)."""
        reference = self.teacher.folder / "train"
        classes = _class_folders(reference)
        for modality in (self.teacher, self.student):
            for split in (self.train_split, self.eval_split):
                folder = modality.folder / split
                other = _class_folders(folder)
                if other != classes:
                    raise ConfigError(
                        f"{DATASET}: class folders differ between {reference} and {folder} (only in the first: "
                        f"{sorted(set(classes) - set(other)) or 'none'}; only in the second: "
                        f"{sorted(set(other) - set(classes)) or 'none'})"
                    )
        return classes

    def _pairs(self, split: str) -> PairedImages:
        """Every teacher file with its student counterpart; a file without one is an error."""
        teacher_dir, student_dir = self.teacher.folder / split, self.student.folder / split
        teacher_files, student_files = _image_files(teacher_dir), _image_files(student_dir)
        students = _by_stem(student_files, student_dir)
        pairs, targets = [], []
        for path, target in teacher_files:
            key = _stem(path, teacher_dir)
            counterpart = students.pop(key, None)
            if counterpart is None:
                raise ConfigError(
                    f"{DATASET}: {path} has no {self.student.name} counterpart: expected {student_dir / key}.<ext> "
                    "(any image extension)"
                )
            pairs.append((path, counterpart))
            targets.append(target)
        if students:
            key, path = min(students.items())
            raise ConfigError(
                f"{DATASET}: {path} has no {self.teacher.name} counterpart: expected {teacher_dir / key}.<ext> "
                "(any image extension)"
            )
        return PairedImages(pairs, targets, self.teacher, self.student)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        plain = PairedImageTransform(self.teacher, self.student, train=False)
        augmented = PairedImageTransform(self.teacher, self.student, train=True)
        train = self._pairs(self.train_split)
        return (
            TransformedDataset(train, augmented if self.augment else plain),
            TransformedDataset(train, plain),
            TransformedDataset(self._pairs(self.eval_split), plain),
        )


def _modality(
    root: Path, role: str, name: str, channels: int, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Modality:
    """Check one modality's options and that its folder exists (else list the folders that do)."""
    folder = root / name
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        listing = _listing(found) if root.is_dir() else "no such folder"
        raise ConfigError(
            f"{DATASET}: no folder for the {role} modality '{name}' ({folder}); folders in {root}: {listing}"
        )
    if channels not in (1, 3):
        raise ConfigError(f"{DATASET}: {role}_channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise ConfigError(f"{DATASET}: {role}_image_size must be positive, got {image_size}")
    return Modality(
        name,
        folder,
        channels,
        image_size,
        _per_channel(mean, channels, f"{role}_mean"),
        _per_channel(std, channels, f"{role}_std"),
    )


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    """One float per channel (a single value applies to all; YAML gives a list)."""
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) not in (1, channels):
        raise ConfigError(f"{DATASET}: {what} must be 1 or {channels} numbers, got {values!r}")
    return numbers * channels if len(numbers) == 1 else numbers


def _splits(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _listing(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


def _class_folders(folder: Path) -> list[str]:
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as error:  # no class folder at all
        raise ConfigError(f"{DATASET}: {error}") from None


def _image_files(folder: Path) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image, found by torchvision's ImageFolder scan."""
    try:
        return ImageFolder(str(folder)).samples
    except FileNotFoundError as error:  # a class folder without any image
        raise ConfigError(f"{DATASET}: {error}") from None


def _stem(path: str, split_dir: Path) -> str:
    """``<class>/<file name without extension>``: what pairs files across modalities."""
    return Path(path).relative_to(split_dir).with_suffix("").as_posix()


def _by_stem(files: list[tuple[str, int]], split_dir: Path) -> dict[str, str]:
    by_stem: dict[str, str] = {}
    for path, _ in files:
        key = _stem(path, split_dir)
        if key in by_stem:
            raise ConfigError(f"{DATASET}: {by_stem[key]} and {path} both pair with {key}; keep one")
        by_stem[key] = path
    return by_stem
