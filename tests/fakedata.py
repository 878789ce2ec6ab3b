"""Small datasets written in the real on-disk formats, so tests run the real readers offline.

CIFAR files are pickled like the originals (Python 2 ``cPickle``, protocol 2): dict keys and names
are Python 2 byte strings, so ``pickle.load(f, encoding="bytes")`` (the CIFAR web page's reader)
sees ``b"data"`` and ``encoding="latin1"`` (torchvision's) sees ``"data"``, as with the real files.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5


class Py2Str(str):
    """A name pickled as a Python 2 ``str`` (SHORT_BINSTRING / BINSTRING), as in the CIFAR files."""


class _Py2Pickler(pickle._Pickler):
    """The pure-Python pickler, which (unlike the C one) lets a type choose its opcodes."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: Py2Str) -> None:
        data = obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
        self.memoize(obj)

    dispatch[Py2Str] = save_py2_str


def _py2(value: Any) -> Any:
    """Turn the str keys and names of a CIFAR dict (recursively) into Python 2 strings."""
    if isinstance(value, dict):
        return {Py2Str(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_py2(v) for v in value]
    if isinstance(value, str):
        return Py2Str(value)
    return value


def write_pickle(path: Path, content: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(_py2(content))
    path.write_bytes(buffer.getvalue())


@dataclass
class FakeCifar:
    """What was written: rows of ``data`` are CHW uint8 images flattened to 3072 bytes."""

    root: Path
    train_data: np.ndarray
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _batch(name: str, data: np.ndarray, labels: dict[str, list[int]]) -> dict[str, Any]:
    filenames = [f"img_{i:05d}.png" for i in range(len(data))]
    return {"batch_label": name, **labels, "data": data, "filenames": filenames}


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> FakeCifar:
    """``root/cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_data, train_labels = _images(rng, 5 * per_batch), rng.integers(0, 10, 5 * per_batch).tolist()
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        batch = _batch(f"training batch {b + 1} of 5", train_data[rows], {"labels": train_labels[rows]})
        write_pickle(folder / f"data_batch_{b + 1}", batch)
    test_data, test_labels = _images(rng, n_test), rng.integers(0, 10, n_test).tolist()
    write_pickle(folder / "test_batch", _batch("testing batch 1 of 1", test_data, {"labels": test_labels}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return FakeCifar(root, train_data, train_labels, test_data, test_labels)


def _learnable_images(rng: np.random.Generator, templates: np.ndarray, labels: list[int]) -> np.ndarray:
    """Each image its class's solid colour, 30% of it replaced by noise: a model learns the classes
    in a few steps (crops and flips keep a colour) and then predicts many different ones."""
    noise = _images(rng, len(labels)).astype(np.float64)
    return (0.7 * templates[labels] + 0.3 * noise).astype(np.uint8)


def write_cifar100(
    root: Path, n_train: int = 50, n_test: int = 20, seed: int = 1, learnable_classes: int | None = None
) -> FakeCifar:
    """``root/cifar-100-python``: train, test, meta; coarse label = fine // 5 (not the real map).
    ``learnable_classes=k``: labels in 0..k-1 and images made from per-class templates."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    colours = rng.integers(0, 256, size=(learnable_classes or 0, 3, 1)).astype(np.float64)
    templates = np.repeat(colours, 32 * 32, axis=2).reshape(-1, 3 * 32 * 32) if learnable_classes else None
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, learnable_classes or 100, n).tolist()
        data = _images(rng, n) if templates is None else _learnable_images(rng, templates, fine)
        labels = {"fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}
        write_pickle(folder / name, _batch(name, data, labels))
        splits[name] = (data, fine)
    meta = {
        "fine_label_names": [f"fine_{i}" for i in range(100)],
        "coarse_label_names": [f"coarse_{i}" for i in range(20)],
    }
    write_pickle(folder / "meta", meta)
    return FakeCifar(root, *splits["train"], *splits["test"])


def accept_written_cifar(monkeypatch: pytest.MonkeyPatch, dataset_class: type[CIFAR10], root: Path) -> None:
    """Make torchvision's md5 table (for this test only) list the md5s of the files written here.

    torchvision checks every CIFAR file against the md5 of the official release, which no written
    file can match. Only the expected checksums change; torchvision's class and its integrity
    check, unpickling and decoding all run unchanged.
    """
    folder = root / dataset_class.base_folder

    def md5s(entries: list[list[str]]) -> list[list[str]]:
        return [[name, calculate_md5(folder / name)] for name, _ in entries]

    monkeypatch.setattr(dataset_class, "train_list", md5s(dataset_class.train_list))
    monkeypatch.setattr(dataset_class, "test_list", md5s(dataset_class.test_list))
    meta = dict(dataset_class.meta, md5=calculate_md5(folder / dataset_class.meta["filename"]))
    monkeypatch.setattr(dataset_class, "meta", meta)


def write_image_folder(
    root: Path, classes: dict[str, list[str]], per_class: int = 4, seed: int = 0
) -> dict[str, tuple[int, int, int]]:
    """``root/<split>/<class>/<i>.png`` for each split and class; every image of a class is one
    solid colour (returned per class), so a label can be read back from the pixels."""
    rng = np.random.default_rng(seed)
    all_classes = sorted({name for names in classes.values() for name in names})
    colours = {name: (40 * i + 20, 255 - 40 * i, (90 * i) % 256) for i, name in enumerate(all_classes)}
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                width, height = (int(v) for v in rng.integers(20, 48, size=2))
                Image.new("RGB", (width, height), colours[name]).save(folder / f"{i}.png")
    return colours
