"""Teachers and soft-label stores: ``kdlab cache`` writes a finished teacher run's outputs, and a
student with ``teacher.source=cache`` opens the store only if it matches its teacher and data.

A store matches when it was written by the same teacher run (same config hash, same model file),
on the same training split (dataset, its options, held-out split) and the same training view
(dataset class and transform reprs). Any difference is refused with a message naming it: a
student silently distilled from another teacher's numbers is the failure this guards against.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.progress import track
from torch import nn

from kdlab.cache import SoftLabelStore, default_store_path, write_store
from kdlab.config import DataConfig, spec_dict
from kdlab.data import DATASETS, ClassificationDataModule, create_datamodule
from kdlab.errors import ConfigError
from kdlab.files import file_sha256
from kdlab.modelio import load_model_weights
from kdlab.models import create_model
from kdlab.runs import read_run_spec

# What decides the training samples and their order; batch sizes and workers do not.
STORE_DATA_KEYS = ("name", "kwargs", "val_fraction", "split_seed", "augment")


def store_data_spec(data: DataConfig) -> dict[str, Any]:
    """The part of a data config a store depends on (options only the student sees left out)."""
    spec = {key: value for key, value in spec_dict(data).items() if key in STORE_DATA_KEYS}
    student_only = DATASETS.get(data.name).student_only_options
    spec["kwargs"] = {k: v for k, v in spec["kwargs"].items() if k not in student_only}
    return spec


def check_deterministic(datamodule: ClassificationDataModule, data: DataConfig) -> None:
    if not datamodule.deterministic_training_view:
        raise ConfigError(
            f"a soft-label store needs training samples that look the same every epoch, but data.augment=true"
            f" draws a new random view of each '{data.name}' sample every epoch (one stored teacher output per"
            " sample would then be wrong); set data.augment=false, or use teacher.source=model"
        )


def read_teacher_run(run_dir: Path) -> dict[str, Any]:
    """The spec of a finished teacher run, or a one-line error saying why it is not one."""
    spec = read_run_spec(run_dir)
    if spec.get("stage") != "teacher":
        raise ConfigError(
            f"{run_dir} is a {spec.get('stage', 'unknown')} run, not a teacher run (runs/teachers/<hash>)"
        )
    if not (run_dir / "metrics.json").exists() or not (run_dir / "model.pt").exists():
        raise ConfigError(f"teacher run {run_dir} has not finished; run its experiment first")
    return spec


def load_teacher_model(run_dir: Path, spec: dict[str, Any], num_classes: int) -> nn.Module:
    """A finished teacher run's model, built from its spec and loaded from its ``model.pt``."""
    model = create_model(spec["model"]["name"], **{"num_classes": num_classes, **spec["model"]["kwargs"]})
    load_model_weights(model, run_dir / "model.pt")
    return model


def cache_data_config(
    spec: dict[str, Any], dataset: str | None, overrides: list[str], data_root: str | None
) -> DataConfig:
    """The teacher run's data config, with ``--dataset``, ``data.*`` overrides and no augmentation
    unless asked for (which is then refused: see :func:`check_deterministic`)."""
    base = {**spec["data"], "root": data_root, "augment": False}
    if dataset is not None and dataset != base["name"]:
        DATASETS.get(dataset)
        base = {**base, "name": dataset, "kwargs": {}}
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), base)
    for override in overrides:
        key, _, value = override.partition("=")
        if not key.startswith("data.") or not value:
            raise ConfigError(f"bad override '{override}': kdlab cache takes data.key=value overrides only")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override.removeprefix("data.")]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"override '{override}': {str(error).splitlines()[0]}") from None
    config = OmegaConf.to_object(merged)
    assert isinstance(config, DataConfig)
    return config


def cache_teacher_run(
    run_dir: Path,
    dataset: str | None = None,
    overrides: list[str] = (),
    data_root: str | None = None,
    top_k: int | None = None,
    dtype: str = "float16",
    out: Path | None = None,
    device: str = "cpu",
) -> tuple[Path, dict[str, Any]]:
    """Run a finished teacher once over the training split and write its outputs as a store."""
    run_dir = Path(run_dir).resolve()
    spec = read_teacher_run(run_dir)
    data = cache_data_config(spec, dataset, list(overrides), data_root)
    datamodule = create_datamodule(data, spec["seed"])
    check_deterministic(datamodule, data)
    datamodule.setup()
    model = load_teacher_model(run_dir, spec, datamodule.num_classes).eval().to(device)
    key = datamodule.teacher_input_key
    data_spec = store_data_spec(data)
    path = Path(out) if out is not None else default_store_path(run_dir.parent.parent, run_dir.name, data_spec, top_k)

    def batches() -> Any:
        expected = 0
        with torch.no_grad():
            # The teacher's forward over the whole split: minutes for a CIFAR-size teacher on a CPU.
            for batch in track(datamodule.ordered_train_dataloader(), description="teacher outputs"):
                index = batch["index"]
                if not torch.equal(index, torch.arange(expected, expected + len(index))):
                    raise RuntimeError("the ordered training loader is out of index order")
                expected += len(index)
                yield model(batch[key].to(device))

    teacher_metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = {
        "teacher": {
            "run": str(run_dir),
            "run_hash": run_dir.name,
            "model_sha256": file_sha256(run_dir / "model.pt"),
            "model": spec["model"],
            "metrics": {k: v for k, v in teacher_metrics.items() if isinstance(v, int | float)},
        },
        "data": data_spec,
        "transform": datamodule.training_view_signature(),
        "input_key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    num_samples = len(datamodule.train_set)  # type: ignore[arg-type]
    manifest = write_store(path, batches(), num_samples, datamodule.num_classes, manifest, top_k, dtype)
    return path, manifest


def open_student_store(
    store: str | None,
    runs_dir: str,
    teacher_run_dir: Path,
    data: DataConfig,
    datamodule: ClassificationDataModule,
    role: str = "teacher",
) -> SoftLabelStore:
    """The store a student reads for this teacher, checked against the teacher run and the data."""
    check_deterministic(datamodule, data)
    data_spec = store_data_spec(data)
    path = Path(store) if store else default_store_path(runs_dir, teacher_run_dir.name, data_spec, None)
    if not (path / "manifest.json").exists():
        where = "teacher.store" if store else "the default store path"
        raise ConfigError(
            f"{role}.source=cache: no finished soft-label store at {path} ({where}); write it with"
            f" `kdlab cache {teacher_run_dir}`" + ("" if data.name == "mnist1d" else f" --data-root <{data.name} root>")
        )
    opened = SoftLabelStore(path)
    _check_match(opened, teacher_run_dir, data_spec, datamodule)
    return opened


def _check_match(
    store: SoftLabelStore, teacher_run_dir: Path, data_spec: dict[str, Any], datamodule: ClassificationDataModule
) -> None:
    manifest, where = store.manifest, f"soft-label store {store.path}"
    teacher = manifest["teacher"]
    if teacher["run_hash"] != teacher_run_dir.name:
        raise ConfigError(
            f"{where} holds the outputs of teacher run {teacher['run_hash']}, but this experiment's teacher is"
            f" run {teacher_run_dir.name} (another model, recipe or seed); write a store for it with"
            f" `kdlab cache {teacher_run_dir}`"
        )
    model_file = teacher_run_dir / "model.pt"
    if model_file.exists() and file_sha256(model_file) != teacher["model_sha256"]:
        raise ConfigError(f"{where} was written from another model.pt than {model_file} holds now (retrained?)")
    if manifest["data"] != data_spec:
        keys = sorted(k for k in {*data_spec, *manifest["data"]} if data_spec.get(k) != manifest["data"].get(k))
        diffs = ", ".join(f"data.{k}: store {manifest['data'].get(k)!r}, run {data_spec.get(k)!r}" for k in keys)
        raise ConfigError(f"{where} was written for other data ({diffs})")
    signature = datamodule.training_view_signature()
    if manifest["transform"] != signature:
        raise ConfigError(
            f"{where} was written with another training transform: store {manifest['transform']!r}, run {signature!r}"
        )
    samples = len(datamodule.train_set)  # type: ignore[arg-type]
    if (store.num_samples, store.num_classes) != (samples, datamodule.num_classes):
        raise ConfigError(
            f"{where} holds {store.num_samples} samples x {store.num_classes} classes; the training split has"
            f" {samples} x {datamodule.num_classes}"
        )
