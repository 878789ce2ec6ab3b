"""Paired (cross-modal) data: MNIST-1D signal -> spectrogram, image folders per modality (PIL-written
PNGs), and the spectrogram student. Views are checked against an STFT written here with numpy and
against the pixels written to disk, not against kdlab's own transforms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.config import DataConfig
from kdlab.data import ClassificationDataModule, create_datamodule
from kdlab.data.mnist1d import mnist1d_arrays
from kdlab.data.signal_augment import SignalAugment
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, tapped_forward
from kdlab.models import count_parameters, create_model

NUM_SAMPLES = 1000  # 800 train / 200 test
PAIRED_KEYS = {"input", "teacher_input", "target", "index", "labelled"}


@pytest.fixture(scope="module", autouse=True)
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One generation for the whole module, in a cache of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDLAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def paired_mnist1d(seed: int = 0, **options: object) -> ClassificationDataModule:
    common = {key: options.pop(key) for key in ("val_fraction", "split_seed") if key in options}
    config = DataConfig(name="paired_mnist1d", batch_size=100, kwargs={"num_samples": NUM_SAMPLES, **options}, **common)  # type: ignore[arg-type]
    datamodule = create_datamodule(config, seed=seed)
    datamodule.setup()
    return datamodule


def numpy_spectrogram(signal: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """[F, T]: periodic Hann frames of the zero-padded signal, |rfft|, log1p, standardised (float64)."""
    padded = np.pad(signal.astype(np.float64), n_fft // 2)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = np.stack([padded[t : t + n_fft] * window for t in range(0, len(padded) - n_fft + 1, hop)])
    image = np.log1p(np.abs(np.fft.rfft(frames, axis=1))).T
    return (image - image.mean()) / (image.std() + 1e-6)


def train_rows(num_train: int, val_fraction: float, split_seed: int) -> list[int]:
    """The training split's rows of the arrays, by base.py's documented rule (sorted complement of
    the first ``round(n * val_fraction)`` of a ``split_seed`` permutation)."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(split_seed)).tolist()
    return sorted(order[round(num_train * val_fraction) :])


def labelled_by_index(datamodule: ClassificationDataModule) -> torch.Tensor:
    """The ``labelled`` flag of every training sample, read from the batches, by ``index``."""
    flags = torch.full((len(datamodule.train_set),), -1, dtype=torch.long)  # type: ignore[arg-type]
    for batch in datamodule.train_dataloader():
        flags[batch["index"]] = batch["labelled"].long()
    assert (flags >= 0).all()
    return flags.bool()


# --- paired_mnist1d ------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_fft", "hop", "shape"), [(16, 2, (1, 9, 21)), (9, 3, (1, 5, 14))])
def test_paired_mnist1d_pairs_each_signal_with_its_spectrogram(n_fft: int, hop: int, shape: tuple[int, ...]) -> None:
    datamodule = paired_mnist1d(spectrogram_n_fft=n_fft, spectrogram_hop=hop, val_fraction=0.1)
    arrays = mnist1d_arrays(num_samples=NUM_SAMPLES)
    assert datamodule.input_shape == shape and datamodule.teacher_input_shape == (40,)  # type: ignore[attr-defined]
    rows = np.array(train_rows(len(arrays["y"]), 0.1, 0))
    splits = [(datamodule.train_dataloader(), arrays["x"][rows], arrays["y"][rows], len(rows))]
    splits.append((datamodule.test_dataloader(), arrays["x_test"], arrays["y_test"], len(arrays["y_test"])))
    for loader, signals, labels, size in splits:
        seen = 0
        for batch in loader:
            assert set(batch) == PAIRED_KEYS
            assert batch["input"].shape == (len(batch["index"]), *shape) and batch["labelled"].dtype == torch.bool
            index = batch["index"].numpy()
            np.testing.assert_array_equal(batch["teacher_input"].numpy(), signals[index])
            np.testing.assert_array_equal(batch["target"].numpy(), labels[index])
            expected = np.stack([numpy_spectrogram(s, n_fft, hop) for s in signals[index]])[:, None]
            np.testing.assert_allclose(batch["input"].numpy(), expected, atol=1e-4)
            seen += len(index)
        assert seen == size


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_student_labels_fraction_is_fixed_by_split_seed_not_the_training_seed(fraction: float) -> None:
    first = labelled_by_index(paired_mnist1d(seed=0, student_labels=fraction, split_seed=3))
    assert int(first.sum()) == round(fraction * len(first)) and len(first) == 720
    assert torch.equal(labelled_by_index(paired_mnist1d(seed=5, student_labels=fraction, split_seed=3)), first)
    if fraction == 0.5:
        assert not torch.equal(labelled_by_index(paired_mnist1d(student_labels=fraction, split_seed=4)), first)


def test_evaluation_loaders_carry_both_views_and_every_label() -> None:
    datamodule = paired_mnist1d(student_labels=0.0)
    loaders = [datamodule.val_dataloader(), datamodule.test_dataloader(), datamodule.calibration_dataloader()]
    for batch in (batch for loader in loaders for batch in loader):
        assert set(batch) == PAIRED_KEYS and batch["labelled"].all()
        assert batch["teacher_input"].shape[1:] == (40,) and batch["input"].shape[1:] == (1, 9, 21)


def test_augmented_spectrogram_is_that_of_the_augmented_signal() -> None:
    datamodule = paired_mnist1d(max_shift=3, scale=0.3, noise_std=0.05)
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    augmented = datamodule.augment_batch(batch)
    torch.manual_seed(0)
    expected_signals = SignalAugment(3, 0.3, 0.05)(batch["teacher_input"])  # mnist1d's augmentation
    torch.testing.assert_close(augmented["teacher_input"], expected_signals, rtol=0, atol=0)
    assert not torch.equal(augmented["teacher_input"], batch["teacher_input"])
    expected = np.stack([numpy_spectrogram(s, 16, 2) for s in expected_signals.numpy()])[:, None]
    np.testing.assert_allclose(augmented["input"].numpy(), expected, atol=1e-4)
    for key in ("target", "index", "labelled"):
        assert torch.equal(augmented[key], batch[key])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"student_labels": 1.5}, "student_labels"),
        ({"spectrogram_n_fft": 41}, "spectrogram_n_fft"),
        ({"spectrogram_hop": 0}, "spectrogram_hop"),
        ({"spectrogram_fft": 8}, "did you mean 'spectrogram_n_fft'"),
    ],
)
def test_bad_paired_mnist1d_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_datamodule(DataConfig(name="paired_mnist1d", kwargs=options))


# --- paired_imagefolder --------------------------------------------------------------------------


def solid_pairs(
    root: Path, splits: tuple[str, ...] = ("train", "val"), classes: tuple[str, ...] = ("a", "b", "c")
) -> None:
    """``root/rgb`` (8-bit RGB) and ``root/depth`` (16-bit grayscale) PNGs; sample ``k`` (numbered
    across splits) is solid: RGB ``(k, 40 * class, 200)``, depth ``257 * k`` (``k / 255`` once read)."""
    k = 0
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(3):
                k += 1
                for modality in ("rgb", "depth"):
                    (root / modality / split / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (30, 20), (k, 40 * c, 200)).save(root / "rgb" / split / name / f"{i}.png")
                depth = np.full((20, 30), 257 * k, dtype=np.uint16)
                Image.fromarray(depth).save(root / "depth" / split / name / f"{i}.png")


def paired_folders(root: Path, augment: bool = False, **options: object) -> ClassificationDataModule:
    kwargs = {"teacher_image_size": 16, "student_image_size": 8, "teacher_mean": [0], "teacher_std": [1], **options}
    config = DataConfig(
        name="paired_imagefolder", root=str(root), batch_size=4, val_fraction=0.25, augment=augment, kwargs=kwargs
    )
    return create_datamodule(config)  # type: ignore[arg-type]


def test_paired_imagefolder_pairs_files_by_path_and_class(tmp_path: Path) -> None:
    solid_pairs(tmp_path)
    datamodule = paired_folders(tmp_path, student_mean=[0], student_std=[1], student_labels=0.5)
    assert datamodule.num_classes == 3 and datamodule.classes == ["a", "b", "c"]  # type: ignore[attr-defined]
    assert datamodule.input_shape == (1, 8, 8) and datamodule.teacher_input_shape == (3, 16, 16)  # type: ignore[attr-defined]
    loaders = [datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()]
    ids, labelled = [], 0
    for split, loader in enumerate(loaders):
        for batch in loader:
            assert set(batch) == PAIRED_KEYS
            assert batch["teacher_input"].shape[1:] == (3, 16, 16) and batch["input"].shape[1:] == (1, 8, 8)
            teacher_id = (batch["teacher_input"][:, 0] * 255).round()
            student_id = batch["input"][:, 0] * 255
            assert (teacher_id == teacher_id[:, :1, :1]).all()  # solid images stay solid
            torch.testing.assert_close(student_id, teacher_id[:, :1, :1].expand_as(student_id), atol=1e-3, rtol=0)
            class_code = (batch["teacher_input"][:, 1, 0, 0] * 255).round()
            assert torch.equal(class_code, 40.0 * batch["target"])
            ids.extend(teacher_id[:, 0, 0].long().tolist())
            labelled += int(batch["labelled"].sum()) if split == 0 else 0
            assert split == 0 or batch["labelled"].all()
    assert sorted(ids) == list(range(1, 19))
    assert labelled == round(0.5 * 7)  # 9 training files, 2 held out


def test_paired_imagefolder_augments_both_views_with_one_crop_and_flip(tmp_path: Path) -> None:
    """Both modalities hold one ramp ``4x + 3y`` (RGB red, 8-bit depth): an independent crop or flip
    per view would give different images."""
    y, x = np.mgrid[0:32, 0:32]
    ramp = (4 * x + 3 * y).astype(np.uint8)
    for split in ("train", "test"):
        for modality in ("rgb", "depth"):
            (tmp_path / modality / split / "a").mkdir(parents=True)
        for i in range(4):
            rgb = np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], axis=-1)
            Image.fromarray(rgb).save(tmp_path / "rgb" / split / "a" / f"{i}.png")
            Image.fromarray(ramp).save(tmp_path / "depth" / split / "a" / f"{i}.png")
    datamodule = paired_folders(tmp_path, augment=True, student_image_size=16, student_mean=[0], student_std=[1])
    datamodule.setup()
    torch.manual_seed(0)
    draws = [datamodule.train_set[0] for _ in range(12)]  # type: ignore[index]
    for sample in draws:
        torch.testing.assert_close(sample["input"][0], sample["teacher_input"][0], atol=1.5 / 255, rtol=0)
    assert len({round(float(sample["input"].mean()), 4) for sample in draws}) > 6  # crops really vary
    assert any(float(s["input"][0, 8, 0] - s["input"][0, 8, -1]) > 0 for s in draws)  # some flipped
    assert any(float(s["input"][0, 8, 0] - s["input"][0, 8, -1]) < 0 for s in draws)  # some not


@pytest.mark.parametrize(
    ("removed", "kept", "missing"),
    [(("depth", "train", "b"), ("rgb", "train", "b"), "depth"), (("rgb", "val", "a"), ("depth", "val", "a"), "rgb")],
)
def test_a_file_without_its_counterpart_is_named_with_the_missing_path(
    tmp_path: Path, removed: tuple[str, ...], kept: tuple[str, ...], missing: str
) -> None:
    solid_pairs(tmp_path)
    stem = "1" if removed[1] == "train" else "0"
    tmp_path.joinpath(*removed, f"{stem}.png").unlink()
    with pytest.raises(ConfigError) as error:
        paired_folders(tmp_path).setup()
    message = str(error.value)
    assert str(tmp_path.joinpath(*kept, f"{stem}.png")) in message
    assert f"no {missing} counterpart: expected {tmp_path.joinpath(*removed, stem)}" in message


def test_missing_modality_folder_lists_the_folders_that_exist(tmp_path: Path) -> None:
    solid_pairs(tmp_path)
    with pytest.raises(ConfigError, match=r"student modality 'thermal'.*folders in .*: depth, rgb$"):
        paired_folders(tmp_path, student_modality="thermal")
    with pytest.raises(ConfigError, match="teacher modality 'RGB'"):
        paired_folders(tmp_path, teacher_modality="RGB")


def test_modalities_must_share_splits_and_classes(tmp_path: Path) -> None:
    solid_pairs(tmp_path, splits=("train", "val"))
    (tmp_path / "depth" / "val").rename(tmp_path / "depth" / "test")
    with pytest.raises(ConfigError, match=r"lacks val/ .*found: test, train"):
        paired_folders(tmp_path)
    (tmp_path / "depth" / "test").rename(tmp_path / "depth" / "val")
    (tmp_path / "depth" / "val" / "c").rename(tmp_path / "depth" / "val" / "d")
    with pytest.raises(ConfigError, match=r"only in the first: \['c'\]; only in the second: \['d'\]"):
        paired_folders(tmp_path)


# --- the spectrogram student ---------------------------------------------------------------------


def test_spectrogram_cnn_reads_the_student_view_and_its_taps_work() -> None:
    datamodule = paired_mnist1d()
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    model = create_model("mnist1d_spectrogram_cnn", num_classes=10, channels=8).eval()
    out = tapped_forward(model, FeatureTaps(model, ("embedding", "stages", "preacts")), batch["input"])
    assert out.logits.shape == (100, 10)
    assert out.features["embedding"].shape == (100, 8)
    torch.testing.assert_close(model.fc(out.features["embedding"]), out.logits)
    assert [tuple(f.shape[1:]) for f in out.features["stages"]] == [(8, 9, 21), (8, 5, 11), (8, 3, 6)]
    for pre, post in zip(out.features["preacts"], out.features["stages"], strict=True):
        torch.testing.assert_close(post, pre.clamp(min=0))
    assert count_parameters(create_model("mnist1d_spectrogram_cnn")) == 5018
