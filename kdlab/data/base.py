"""The contract every kdlab data module keeps, so schemes never care which dataset they train on.

Batches are dicts ``{"input", "target", "index"}``: ``index`` is the sample's position in the
training split, which later methods (contrastive memory banks, the soft-label store) key on.
The training split loses a fixed held-out part (``val_fraction``, drawn with ``split_seed``) that
is seen with evaluation transforms: it validates, and it fits the teacher's calibration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset, default_collate

from kdlab.errors import ConfigError


@dataclass(frozen=True)
class DataInfo:
    """What methods may know about the training split before training (memory banks, samplers)."""

    num_samples: int
    num_classes: int
    targets: torch.Tensor  # labels of the training split, indexed by ``batch["index"]``


class Batch(TypedDict):
    input: torch.Tensor
    target: torch.Tensor
    index: torch.Tensor


class IndexedDataset(Dataset):
    """Turn ``(x, y)`` samples into ``{"input", "target", "index"}`` dicts.

    A split held in tensors (MNIST-1D, synthetic data) is fetched a whole batch at a time: one
    indexing per tensor instead of a sample at a time and a collate, which had made MNIST-1D's
    loader take a quarter of the KD step (bench/loader.py). The batch is the one collated samples
    make, value for value; kdlab's loaders pass it through (:func:`collate`)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.in_tensors = _held_in_tensors(dataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        x, y = self.dataset[index]
        return {"input": x, "target": torch.as_tensor(y, dtype=torch.long), "index": index}

    def __getitems__(self, indices: list[int]) -> Batch | list[dict[str, Any]]:
        """What a DataLoader fetches for one batch."""
        if not self.in_tensors:
            return [self[i] for i in indices]
        x, y = self.dataset[indices]  # Subset and TensorDataset index with a list
        return {"input": x, "target": y.long(), "index": torch.tensor(indices)}


def _held_in_tensors(dataset: Dataset) -> bool:
    if isinstance(dataset, Subset):
        return _held_in_tensors(dataset.dataset)
    return isinstance(dataset, TensorDataset)


def collate(samples: Batch | list[dict[str, Any]]) -> Batch:
    """A batch fetched whole passes through; a list of samples is collated as usual."""
    return samples if isinstance(samples, dict) else default_collate(samples)  # type: ignore[return-value]


class TransformedDataset(Dataset):
    """Apply ``transform`` to the ``x`` of a base dataset's ``(x, y)`` samples.

    The augmented and the plain view of a training split wrap one loaded copy of it, instead of
    reading (and holding) the split twice.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Any]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.base[index]
        return self.transform(x), y


class EpochShuffle(Sampler[int]):
    """A random order that depends only on ``(seed, epoch)``; on ``world`` processes, rank ``r``'s
    share of it (see :class:`RankShard`).

    Lightning calls ``set_epoch`` before each epoch, so a resumed run replays exactly the order an
    uninterrupted run would have drawn, whatever happened to the global random stream before.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.shard = RankShard(rank, world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.shard.length(self.size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from self.shard(torch.randperm(self.size, generator=generator).tolist())


@dataclass(frozen=True)
class RankShard:
    """Positions ``rank::world`` of an order, padded (from its start) to a multiple of ``world``
    so every rank takes as many steps. With per-device batch ``B / world``, the ranks' batch ``k``
    together are exactly the one-process batch ``k`` of size ``B``. (Lightning's own sampler
    wrapper would re-shuffle the order, so kdlab shards itself.)"""

    rank: int = 0
    world: int = 1

    def length(self, size: int) -> int:
        return -(-size // self.world)

    def __call__(self, order: list[int]) -> list[int]:
        if self.world == 1:
            return order
        total = self.length(len(order)) * self.world
        padded = [order[i % len(order)] for i in range(total)]  # cycles: a split may be smaller than world
        return padded[self.rank : total : self.world]


class ShardedSequence(Sampler[int]):
    """Rank ``r``'s share of ``0..size-1`` in order (evaluation on several processes). When
    ``size`` does not divide by ``world``, the last sample of some ranks repeats one of another
    rank: every rank then runs as many forwards (ZeRO-3 and FSDP2 gather weights in lockstep), and
    :meth:`counted` tells the metrics to skip the repeats, so each sample counts exactly once."""

    def __init__(self, size: int, shard: RankShard) -> None:
        self.size = size
        self.shard = shard

    def __len__(self) -> int:
        return self.shard.length(self.size)

    def __iter__(self) -> Iterator[int]:
        yield from self.shard(list(range(self.size)))

    def counted(self, first: int, rows: int) -> torch.Tensor:
        """Which of this rank's samples ``first .. first + rows - 1`` are not repeats."""
        positions = self.shard.rank + torch.arange(first, first + rows) * self.shard.world
        return positions < self.size


def counted_rows(trainer: L.Trainer, split: str, batch_idx: int, rows: int) -> torch.Tensor | None:
    """The rows of ``split``'s ("val" or "test") evaluation batch ``batch_idx`` that count towards
    metrics, or None when all do (one process, or no repeat in this batch)."""
    loader = trainer.val_dataloaders if split == "val" else trainer.test_dataloaders
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, ShardedSequence):
        return None
    counted = sampler.counted(batch_idx * loader.batch_size, rows)
    return None if bool(counted.all()) else counted


class ClassificationDataModule(L.LightningDataModule, ABC):
    """Train / held-out / test splits of a classification dataset with dict batches."""

    num_classes: int
    input_shape: tuple[int, ...]
    # Options (``data.kwargs``) that change only what the student sees, never a teacher's training:
    # teachers are shared across them.
    student_only_options: tuple[str, ...] = ()
    # The batch key of what teachers see: paired (cross-modal) data gives them their own modality.
    teacher_input_key: str = "input"

    def __init__(
        self,
        *,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
        root: str | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.augment = self.configured_augment = augment
        self.root = root
        self.shuffle_seed = shuffle_seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @abstractmethod
    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return (train split with training transforms, the same split with evaluation
        transforms, test split). Samples are ``(x, y)`` pairs."""

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_augmented, train_plain, test = self.build_datasets()
        n = len(train_augmented)  # type: ignore[arg-type]
        n_val = round(n * self.val_fraction)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        self.train_set = IndexedDataset(Subset(train_augmented, train_idx))
        self.val_set = IndexedDataset(Subset(train_plain, val_idx)) if n_val else None
        self.test_set = IndexedDataset(test)

    def data_info(self) -> DataInfo:
        self.setup()
        assert self.train_set is not None
        targets = dataset_targets(self.train_set)
        return DataInfo(len(targets), self.num_classes, targets)

    @property
    def has_validation(self) -> bool:
        self.setup()
        return self.val_set is not None

    def _loader(self, dataset: Dataset | None, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        assert dataset is not None, "setup() has not built this split"
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            # Its own generator: creating an iterator never draws from the global random stream
            # that augmentation and dropout use, so that stream is the same in a resumed epoch.
            generator=torch.Generator().manual_seed(self.shuffle_seed),
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        shard = self.rank_shard()
        if self.batch_size % shard.world:
            raise ConfigError(f"data.batch_size={self.batch_size} does not divide over {shard.world} processes")
        sampler = EpochShuffle(len(self.train_set), self.shuffle_seed, shard.rank, shard.world)
        # ``batch_size`` is the global batch: each process loads its share.
        return self._loader(self.train_set, self.batch_size // shard.world, sampler)

    def rank_shard(self) -> RankShard:
        """This process's share of the data while a trainer is attached (the trainer is told not
        to add samplers of its own); everything outside training sees whole splits."""
        trainer = self.trainer
        return RankShard(trainer.global_rank, trainer.world_size) if trainer is not None else RankShard()

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader:
        assert dataset is not None, "setup() has not built this split"
        shard = self.rank_shard()
        sampler = ShardedSequence(len(dataset), shard) if shard.world > 1 else None  # type: ignore[arg-type]
        return self._loader(dataset, self.eval_batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._eval_loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.test_set)

    def augment_batch(self, batch: Batch) -> Batch:
        """Augment a whole training batch on its device; datasets that augment per sample (in
        their transforms) leave this as it is."""
        return batch

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.augment and self.trainer is not None and self.trainer.training:
            return self.augment_batch(batch)
        return batch

    def use_augmentation(self, augment: bool | None) -> None:
        """Train the next model with (``True``) or without augmentation; ``None``: as configured.
        Teacher and student recipes may differ, so the training split is rebuilt on a change."""
        effective = self.configured_augment if augment is None else augment
        if effective != self.augment:
            self.augment = effective
            self.train_set = self.val_set = self.test_set = None

    @property
    def deterministic_training_view(self) -> bool:
        """Whether a training sample looks the same every epoch (what a soft-label store needs:
        one stored teacher output per sample is then exact). kdlab's datasets augment only with
        ``augment``; a dataset with other random training transforms overrides this."""
        return not self.augment

    def training_view_signature(self) -> str:
        """A description of how training samples are made (dataset class, augmentation and every
        transform's repr): a soft-label store records it and refuses a student whose differs."""
        self.setup()
        transforms = [repr(t) for t in _transforms(self.train_set)]
        return f"{type(self).__name__}(augment={self.augment}) " + " | ".join(transforms)

    def ordered_train_dataloader(self) -> DataLoader:
        """The training split in index order with its training transforms (the store's writer)."""
        self.setup()
        return self._loader(self.train_set, self.eval_batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """The held-out split, for fitting a calibration; refused when there is none."""
        if not self.has_validation:
            raise ConfigError("calibration needs a held-out split: set data.val_fraction > 0")
        return self._loader(self.val_set, self.eval_batch_size)


def _transforms(dataset: Dataset | None) -> list[Any]:
    """The transforms applied along a chain of dataset wrappers, outermost first."""
    found = []
    while dataset is not None:
        transform = getattr(dataset, "transform", None)
        if transform is not None:
            found.append(transform)
        dataset = (
            getattr(dataset, "dataset", None) or getattr(dataset, "base", None) or getattr(dataset, "samples", None)
        )
        if not isinstance(dataset, Dataset):
            break
    return found


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """All labels of a dataset without loading its inputs (torchvision ``targets``, tensor datasets,
    and kdlab's wrappers around them)."""
    if isinstance(dataset, IndexedDataset | TransformedDataset):
        return dataset_targets(dataset.dataset if isinstance(dataset, IndexedDataset) else dataset.base)
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets, dtype=torch.long)
    raise TypeError(f"cannot read the labels of a {type(dataset).__name__} without loading it; give it .targets")
