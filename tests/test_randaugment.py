"""RandAugment (``data.kwargs.randaugment``) on CIFAR and image-folder files in their real formats:
it changes training images beyond crop and flip, only with ``data.augment``, and a bad config
string fails when the data module is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakedata import accept_written_cifar, write_cifar10, write_image_folder
from test_data import crop_and_flip, split_indices, to_uint8
from timm.data.auto_augment import RandAugment
from torchvision.datasets import CIFAR10

from kdlab.config import DataConfig
from kdlab.data import create_datamodule
from kdlab.errors import ConfigError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
RA = "rand-m9-mstd0.5"


def cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: object):  # type: ignore[no-untyped-def]
    fake = write_cifar10(tmp_path)
    accept_written_cifar(monkeypatch, CIFAR10, tmp_path)
    kwargs = options.pop("kwargs", {})
    datamodule = create_datamodule(DataConfig(name="cifar10", root=str(fake.root), kwargs=kwargs, **options))  # type: ignore[arg-type]
    datamodule.setup()
    return datamodule, fake


def test_cifar_randaugment_changes_images_beyond_crop_and_flip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule, fake = cifar10(tmp_path, monkeypatch, kwargs={"randaugment": RA})
    transform = datamodule.train_set.dataset.dataset.transform  # type: ignore[union-attr]
    assert [type(t).__name__ for t in transform.transforms][:3] == ["RandomCrop", "RandomHorizontalFlip", "RandAugment"]
    image = fake.train_data[split_indices(datamodule.train_set)[0]].reshape(3, 32, 32)
    torch.manual_seed(0)
    draws = [crop_and_flip(to_uint8(datamodule.train_set[0]["input"], MEAN, STD), image) for _ in range(24)]
    assert None in draws  # some views are no crop-and-flip of the image: RandAugment acted
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input"].shape[1:] == (3, 32, 32) and batch["input"].dtype == torch.float32


def test_cifar_randaugment_only_with_augment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule, _ = cifar10(tmp_path, monkeypatch, augment=False, kwargs={"randaugment": RA})
    assert torch.equal(datamodule.train_set[0]["input"], datamodule.train_set[0]["input"])


@pytest.mark.parametrize("bad", ["rand-m9-q2", "rand-mx", "augmix-m5", "m9"])
def test_bad_randaugment_string_fails_at_construction(
    bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match=f"bad randaugment '{bad}'"):
        cifar10(tmp_path, monkeypatch, kwargs={"randaugment": bad})
    folder = tmp_path / "folder"
    write_image_folder(folder, {"train": ["a"], "val": ["a"]}, per_class=1)
    with pytest.raises(ConfigError, match=f"dataset 'imagefolder': bad randaugment '{bad}'"):
        create_datamodule(DataConfig(name="imagefolder", root=str(folder), kwargs={"randaugment": bad}))


def test_imagefolder_randaugment_recolours_solid_images(tmp_path: Path) -> None:
    """Crop and flip keep a solid image one colour; RandAugment's colour ops (invert, solarize,
    posterize, ...) and fills do not."""
    colours = write_image_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, per_class=4)
    kwargs = {"image_size": 16, "mean": [0, 0, 0], "std": [1, 1, 1]}

    def off_colour(options: dict[str, object]) -> int:
        config = DataConfig(name="imagefolder", root=str(tmp_path), val_fraction=0.0, kwargs={**kwargs, **options})
        datamodule = create_datamodule(config)
        datamodule.setup()
        torch.manual_seed(0)
        count = 0
        for _ in range(5):
            for sample in datamodule.train_set:  # type: ignore[union-attr]
                colour = torch.tensor(colours[datamodule.classes[int(sample["target"])]]) / 255  # type: ignore[attr-defined]
                count += int(not torch.allclose(sample["input"], colour[:, None, None].expand(3, 16, 16), atol=1e-2))
        return count

    assert off_colour({}) == 0
    assert off_colour({"randaugment": RA}) > 0
    config = DataConfig(name="imagefolder", root=str(tmp_path), kwargs={**kwargs, "randaugment": RA})
    transform = create_datamodule(config)
    transform.setup()
    steps = transform.train_set.dataset.dataset.transform.transforms  # type: ignore[union-attr]
    assert any(isinstance(t, RandAugment) for t in steps)
