"""Data modules on small datasets written in the real formats (tests/fakedata.py): CIFAR-10/100
through torchvision's own readers, ImageFolder through PIL-written PNGs, and MNIST-1D generation."""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakedata import FakeCifar, accept_written_cifar, write_cifar10, write_cifar100, write_image_folder
from torch.utils.data import default_collate
from torchvision.datasets import CIFAR10, CIFAR100

from kdlab.config import DataConfig
from kdlab.data import ClassificationDataModule, create_datamodule
from kdlab.data.mnist1d import mnist1d_arrays
from kdlab.errors import ConfigError

# name -> (torchvision class, writer, mean, std, classes): the normalisation the brief fixes.
CIFARS = {
    "cifar10": (CIFAR10, write_cifar10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
    "cifar100": (CIFAR100, write_cifar100, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), 100),
}


def to_uint8(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo Normalize and ToTensor: the CHW uint8 image(s) a tensor came from."""
    shape = (3, 1, 1)
    pixels = (x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy()


def split_indices(subset_dataset: object) -> list[int]:
    """Positions in the full training split behind an IndexedDataset(Subset(...)) split."""
    return list(subset_dataset.dataset.indices)  # type: ignore[attr-defined]


@pytest.fixture(params=sorted(CIFARS))
def cifar(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, FakeCifar]:
    dataset_class, write = CIFARS[request.param][:2]
    fake = write(tmp_path)
    accept_written_cifar(monkeypatch, dataset_class, tmp_path)
    return request.param, fake


def cifar_module(name: str, fake: FakeCifar, **options: object) -> ClassificationDataModule:
    datamodule = create_datamodule(DataConfig(name=name, root=str(fake.root), **options))  # type: ignore[arg-type]
    datamodule.setup()
    return datamodule


# --- CIFAR ---------------------------------------------------------------------------------------


def test_written_cifar_files_read_like_the_originals(tmp_path: Path) -> None:
    """The web page's reader (encoding="bytes") sees bytes keys, as with the released files."""
    fake10, fake100 = write_cifar10(tmp_path / "c10"), write_cifar100(tmp_path / "c100")
    with open(fake10.root / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    assert {b"data", b"labels", b"batch_label", b"filenames"} == set(batch)
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (10, 3072)
    with open(fake100.root / "cifar-100-python" / "meta", "rb") as handle:
        meta = pickle.load(handle, encoding="bytes")
    assert meta[b"fine_label_names"][3] == b"fine_3" and len(meta[b"coarse_label_names"]) == 20


def test_cifar_batches_are_dicts_of_the_right_shape(cifar: tuple[str, FakeCifar]) -> None:
    name, fake = cifar
    datamodule = cifar_module(name, fake, batch_size=8, val_fraction=0.25)
    assert datamodule.num_classes == CIFARS[name][4]
    assert datamodule.input_shape == (3, 32, 32)
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input", "target", "index"}
    assert batch["input"].shape == (8, 3, 32, 32) and batch["input"].dtype == torch.float32
    assert batch["target"].shape == (8,) and batch["target"].dtype == torch.long
    assert batch["index"].dtype == torch.long
    test_batch = next(iter(datamodule.test_dataloader()))
    assert test_batch["input"].shape == (len(fake.test_labels), 3, 32, 32)


def test_cifar_pixels_and_labels_round_trip(cifar: tuple[str, FakeCifar]) -> None:
    """Every un-augmented sample is the written image with its written (fine) label."""
    name, fake = cifar
    mean, std = CIFARS[name][2:4]
    datamodule = cifar_module(name, fake, batch_size=8, val_fraction=0.25, augment=False)
    assert (datamodule.mean, datamodule.std) == (mean, std)  # type: ignore[attr-defined]
    written = fake.train_data.reshape(-1, 3, 32, 32)
    labels = np.array(fake.train_labels)
    seen = []
    for split, loader in (
        (datamodule.train_set, datamodule.train_dataloader()),
        (datamodule.val_set, datamodule.val_dataloader()),
    ):
        positions = np.array(split_indices(split))
        for batch in loader:
            rows = positions[batch["index"].numpy()]
            np.testing.assert_array_equal(to_uint8(batch["input"], mean, std), written[rows])
            np.testing.assert_array_equal(batch["target"].numpy(), labels[rows])
            seen.extend(rows.tolist())
    assert sorted(seen) == list(range(len(labels)))
    (test_batch,) = list(datamodule.test_dataloader())
    np.testing.assert_array_equal(to_uint8(test_batch["input"], mean, std), fake.test_data.reshape(-1, 3, 32, 32))
    assert test_batch["target"].tolist() == fake.test_labels


def test_cifar_held_out_split_is_disjoint_and_fixed_by_split_seed(cifar: tuple[str, FakeCifar]) -> None:
    name, fake = cifar
    n = len(fake.train_labels)
    first = cifar_module(name, fake, val_fraction=0.2, split_seed=0)
    train, held_out = split_indices(first.train_set), split_indices(first.val_set)
    assert len(held_out) == round(0.2 * n)
    assert not set(train) & set(held_out) and sorted(train + held_out) == list(range(n))
    assert split_indices(cifar_module(name, fake, val_fraction=0.2, split_seed=0).val_set) == held_out
    assert split_indices(cifar_module(name, fake, val_fraction=0.2, split_seed=1).val_set) != held_out


def crop_and_flip(augmented: np.ndarray, image: np.ndarray) -> tuple[int, int, bool] | None:
    """The (row, column, flipped) of a 4-pixel-padded random crop that turns ``image`` into
    ``augmented``, or None when no crop and flip does."""
    padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            for flipped in (False, True):
                if np.array_equal(crop[..., ::-1] if flipped else crop, augmented):
                    return dy, dx, flipped
    return None


def test_cifar_augment_is_random_crop_and_flip_and_nothing_else(cifar: tuple[str, FakeCifar]) -> None:
    name, fake = cifar
    mean, std = CIFARS[name][2:4]
    augmented = cifar_module(name, fake, augment=True)
    image = fake.train_data[split_indices(augmented.train_set)[0]].reshape(3, 32, 32)
    torch.manual_seed(0)
    draws = [crop_and_flip(to_uint8(augmented.train_set[0]["input"], mean, std), image) for _ in range(16)]
    assert None not in draws
    assert {flipped for _, _, flipped in draws} == {False, True}  # type: ignore[misc]
    assert len({(dy, dx) for dy, dx, _ in draws}) > 1  # type: ignore[misc]
    assert torch.equal(augmented.val_set[0]["input"], augmented.val_set[0]["input"])  # held out: no augment
    plain = cifar_module(name, fake, augment=False)
    assert torch.equal(plain.train_set[0]["input"], plain.train_set[0]["input"])


@pytest.mark.parametrize("name", sorted(CIFARS))
def test_cifar_without_root_asks_for_data_root(name: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.root"):
        create_datamodule(DataConfig(name=name))


@pytest.mark.parametrize("name", sorted(CIFARS))
def test_cifar_missing_folder_names_the_expected_path(name: str, tmp_path: Path) -> None:
    expected = tmp_path / CIFARS[name][0].base_folder
    with pytest.raises(ConfigError, match="never downloads") as error:
        create_datamodule(DataConfig(name=name, root=str(tmp_path)))
    assert str(expected) in str(error.value)


@pytest.mark.parametrize("name", sorted(CIFARS))
def test_cifar_missing_file_is_named(name: str, tmp_path: Path) -> None:
    dataset_class, write = CIFARS[name][:2]
    write(tmp_path)
    missing = dataset_class.test_list[0][0]
    (tmp_path / dataset_class.base_folder / missing).unlink()
    with pytest.raises(ConfigError, match=f"lacks {missing}"):
        create_datamodule(DataConfig(name=name, root=str(tmp_path)))


@pytest.mark.parametrize("name", sorted(CIFARS))
def test_cifar_md5_check_stays_on(name: str, tmp_path: Path) -> None:
    """Without the test's checksums, torchvision rejects the written files: a ConfigError at setup."""
    dataset_class, write = CIFARS[name][:2]
    write(tmp_path)
    datamodule = create_datamodule(DataConfig(name=name, root=str(tmp_path)))
    with pytest.raises(ConfigError, match="md5") as error:
        datamodule.setup()
    assert dataset_class.train_list[0][0] in str(error.value)


# --- ImageFolder ---------------------------------------------------------------------------------


def imagefolder_module(root: Path, **kwargs: object) -> ClassificationDataModule:
    options = {"batch_size": 4, "val_fraction": 0.25, "augment": kwargs.pop("augment", True)}
    return create_datamodule(
        DataConfig(name="imagefolder", root=str(root), kwargs={"image_size": 16, **kwargs}, **options)
    )  # type: ignore[arg-type]


def test_imagefolder_classes_are_known_before_setup_and_batches_fit(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["cat", "dog", "emu"], "val": ["cat", "dog", "emu"]}, per_class=4)
    datamodule = imagefolder_module(tmp_path)
    assert datamodule.train_set is None
    assert datamodule.num_classes == 3 and datamodule.classes == ["cat", "dog", "emu"]  # type: ignore[attr-defined]
    assert datamodule.input_shape == (3, 16, 16)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input"].shape == (4, 3, 16, 16) and batch["target"].dtype == torch.long
    (test_batch,) = list(datamodule.test_dataloader())
    assert test_batch["input"].shape == (12, 3, 16, 16)


def test_imagefolder_labels_round_trip(tmp_path: Path) -> None:
    """Each class is one colour: the pixels of every sample give back its label."""
    colours = write_image_folder(tmp_path, {"train": ["a", "b", "c"], "test": ["a", "b", "c"]}, per_class=3)
    datamodule = imagefolder_module(tmp_path, mean=[0, 0, 0], std=[1, 1, 1], augment=False)
    classes = datamodule.classes  # type: ignore[attr-defined]
    loaders = [datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()]
    count = 0
    for batch in (batch for loader in loaders for batch in loader):
        for image, target in zip(to_uint8(batch["input"], (0, 0, 0), (1, 1, 1)), batch["target"], strict=True):
            assert (image == np.array(colours[classes[target]], dtype=np.uint8).reshape(3, 1, 1)).all()
            count += 1
    assert count == 9 + 9


def test_imagefolder_mismatched_classes_are_refused(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "b", "d"]}, per_class=1)
    with pytest.raises(ConfigError, match=r"only in train: \['c'\]; only in val: \['d'\]"):
        imagefolder_module(tmp_path)


def test_imagefolder_without_an_evaluation_split_lists_what_it_found(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["a"], "holdout": ["a"]}, per_class=1)
    with pytest.raises(ConfigError, match="found: holdout, train"):
        imagefolder_module(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.root"):
        create_datamodule(DataConfig(name="imagefolder"))


def test_imagefolder_rejects_bad_normalisation(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": ["a"], "val": ["a"]}, per_class=1)
    with pytest.raises(ConfigError, match="mean must be 3 numbers"):
        imagefolder_module(tmp_path, mean=[0.5, 0.5])


# --- MNIST-1D ------------------------------------------------------------------------------------


Arrays = dict[str, np.ndarray]


def test_mnist1d_default_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path))
    arrays = mnist1d_arrays()
    assert arrays["x"].shape == (4000, 40) and arrays["x_test"].shape == (1000, 40)
    assert arrays["y"].shape == (4000,) and arrays["y_test"].shape == (1000,)
    assert arrays["x"].dtype == np.float32 and arrays["y"].dtype == np.int64
    assert set(arrays["y"].tolist()) == set(arrays["y_test"].tolist()) == set(range(10))


@dataclass
class Mnist1dRuns:
    generated: Arrays
    read_back: Arrays
    regenerated: Arrays
    cache_files: list[Path]


@pytest.fixture(scope="module")
def mnist1d_runs(tmp_path_factory: pytest.TempPathFactory) -> Mnist1dRuns:
    """Generate into an empty cache, read it back, then generate again into another empty cache."""
    first, second = tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDLAB_CACHE_DIR", str(first))
        generated = mnist1d_arrays(num_samples=1000)
        read_back = mnist1d_arrays(num_samples=1000)
        patch.setenv("KDLAB_CACHE_DIR", str(second))
        regenerated = mnist1d_arrays(num_samples=1000)
    return Mnist1dRuns(generated, read_back, regenerated, list(first.rglob("*.npz")))


def assert_same_arrays(a: Arrays, b: Arrays) -> None:
    assert set(a) == set(b) == {"x", "y", "x_test", "y_test"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_mnist1d_generation_is_deterministic(mnist1d_runs: Mnist1dRuns) -> None:
    assert mnist1d_runs.generated["x"].shape == (800, 40)
    assert_same_arrays(mnist1d_runs.generated, mnist1d_runs.regenerated)


def test_mnist1d_cache_reads_back_a_fresh_generation(mnist1d_runs: Mnist1dRuns) -> None:
    (cache_file,) = mnist1d_runs.cache_files
    with np.load(cache_file) as stored:
        assert_same_arrays({key: stored[key] for key in stored.files}, mnist1d_runs.regenerated)
    assert_same_arrays(mnist1d_runs.read_back, mnist1d_runs.regenerated)


def test_mnist1d_dataset_seed_changes_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path))
    one, two = (
        mnist1d_arrays(num_samples=500, dataset_seed=1),
        mnist1d_arrays(num_samples=500, dataset_seed=2),
    )
    assert one["x"].shape == two["x"].shape and not np.array_equal(one["x"], two["x"])


def test_mnist1d_datamodule_leaves_global_rngs_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path))  # empty cache: setup really generates
    np.random.seed(123)
    random.seed(123)
    datamodule = create_datamodule(DataConfig(name="mnist1d", kwargs={"num_samples": 500, "dataset_seed": 7}))
    datamodule.setup()
    after = (np.random.random(4).tolist(), random.random())
    assert list(tmp_path.rglob("*.npz")), "setup did not generate"
    np.random.seed(123)
    random.seed(123)
    assert after == (np.random.random(4).tolist(), random.random())
    assert len(datamodule.train_set) == 360 and datamodule.num_classes == 10  # type: ignore[arg-type]


def test_tensor_splits_load_whole_batches_equal_to_collated_samples() -> None:
    """MNIST-1D and synthetic splits are fetched a batch at a time; the batches must be the ones
    the per-sample path collates, value for value and dtype for dtype, in the sampler's order."""
    datamodule = create_datamodule(DataConfig(name="synthetic", batch_size=8, kwargs={"num_samples": 40}))
    datamodule.setup()
    assert datamodule.train_set.in_tensors  # type: ignore[union-attr]
    for batch in datamodule.train_dataloader():
        indices = batch["index"].tolist()
        expected = default_collate([datamodule.train_set[i] for i in indices])  # type: ignore[index]
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            assert batch[key].dtype == value.dtype and torch.equal(batch[key], value), key


@pytest.mark.parametrize("size", [1, 5, 7, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_sharded_evaluation_counts_every_sample_exactly_once(size: int, world: int, batch_size: int) -> None:
    """Ranks evaluate as many batches each (sharded models forward in lockstep), so a split that
    does not divide by the world repeats samples; the repeats are the rows counted_rows drops."""
    from torch.utils.data import DataLoader, TensorDataset

    from kdlab.data.base import IndexedDataset, RankShard, ShardedSequence, collate, counted_rows

    split = IndexedDataset(TensorDataset(torch.randn(size, 3), torch.zeros(size)))
    seen: list[int] = []
    batches_per_rank = set()
    for rank in range(world):
        sampler = ShardedSequence(size, RankShard(rank, world))
        loader = DataLoader(split, batch_size=batch_size, sampler=sampler, collate_fn=collate)
        batches = list(loader)
        batches_per_rank.add(len(batches))
        for batch_idx, batch in enumerate(batches):
            trainer = SimpleNamespace(val_dataloaders=loader)  # what counted_rows reads of Lightning's trainer
            counted = counted_rows(trainer, "val", batch_idx, len(batch["index"]))
            seen += batch["index"][counted if counted is not None else slice(None)].tolist()
    assert len(batches_per_rank) == 1
    assert sorted(seen) == list(range(size))


def test_a_loader_without_a_sharded_sampler_counts_every_row() -> None:
    from torch.utils.data import DataLoader

    from kdlab.data.base import counted_rows

    trainer = SimpleNamespace(test_dataloaders=DataLoader(list(range(10)), batch_size=4))
    assert counted_rows(trainer, "test", 2, 2) is None
