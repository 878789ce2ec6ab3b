"""The soft-label store: written once from a real teacher run, read instead of the teacher, exact
up to fp16, and refused whenever it does not belong to the student's teacher, data or transform."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.cache import SoftLabelStore, write_store
from kdlab.catalog import load_experiment
from kdlab.cli import main
from kdlab.config import ExperimentConfig
from kdlab.errors import ConfigError
from kdlab.pipeline import build_student_system, ensure_teacher, plan_experiment, run_experiment
from kdlab.teachers.stored import cache_teacher_run

FAST = ["teacher.train.epochs=2", "student.train.epochs=1", "runtime.wandb=disabled", "runtime.progress=false"]
FROM_STORE = ["teacher.source=cache", "student.train.augment=false"]


def _config(runs: Path, *overrides: str) -> ExperimentConfig:
    return load_experiment("mnist1d-kd", [f"runtime.runs_dir={runs}", *FAST, *overrides])


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A teacher trained with augmentation (2 epochs), and its full-logit store."""
    runs = tmp_path_factory.mktemp("runs")
    plan = plan_experiment(_config(runs))
    ensure_teacher(plan)
    store, _ = cache_teacher_run(plan.teacher_run.dir)
    return runs, plan.teacher_run.dir, store


def test_store_holds_the_teachers_logits_of_every_training_sample(cached: tuple[Path, Path, Path]) -> None:
    runs, teacher_run, path = cached
    store = SoftLabelStore(path)
    plan = plan_experiment(_config(runs, "student.train.augment=false"))
    model, _ = ensure_teacher(plan)
    model.eval()
    datamodule = plan.datamodule
    datamodule.use_augmentation(False)
    datamodule.setup()
    inputs = torch.stack([datamodule.train_set[i]["input"] for i in range(len(datamodule.train_set))])
    with torch.no_grad():
        expected = model(inputs)
    stored = store.logits(torch.arange(len(inputs)))
    assert store.num_samples == len(inputs) == 3600 and store.num_classes == 10
    # fp16 keeps 11 significant bits: relative error at most 2**-11 per logit.
    assert torch.allclose(stored, expected, rtol=2**-11, atol=1e-4)
    manifest = store.manifest
    assert manifest["teacher"]["run_hash"] == teacher_run.name and manifest["data"]["augment"] is False
    assert manifest["files"]["logits.npy"]["dtype"] == "float16" and store.bytes_per_sample < 2 * 10 + 1


def test_kd_from_the_store_equals_online_kd_on_the_same_batches(cached: tuple[Path, Path, Path]) -> None:
    runs, _, _ = cached
    online_plan = plan_experiment(_config(runs, "student.train.augment=false"))
    stored_plan = plan_experiment(_config(runs, *FROM_STORE))
    assert stored_plan.student_run.dir != online_plan.student_run.dir  # fp16 numbers: another run
    teacher, _ = ensure_teacher(online_plan)
    stored, _ = ensure_teacher(stored_plan)
    online = build_student_system(online_plan, teacher)
    from_store = build_student_system(stored_plan, stored)
    from_store.student.load_state_dict(online.student.state_dict())
    datamodule = online_plan.datamodule
    datamodule.use_augmentation(False)
    for batch, _ in zip(datamodule.ordered_train_dataloader(), range(3), strict=False):
        expected = online.loss_terms(batch)
        got = from_store.loss_terms(batch)
        assert set(got) == set(expected) == {"ce", "kd"}
        assert got["ce"].item() == pytest.approx(expected["ce"].item(), rel=1e-6)
        assert got["kd"].item() == pytest.approx(expected["kd"].item(), rel=2e-3, abs=1e-5)


def test_a_student_from_the_store_never_needs_the_teacher(cached: tuple[Path, Path, Path], tmp_path: Path) -> None:
    runs, teacher_run, store = cached
    copy_runs = tmp_path / "runs"
    shutil.copytree(runs / "stores", copy_runs / "stores")  # the store, without the teacher run
    outcome = run_experiment(_config(copy_runs, *FROM_STORE, f"teacher.store={store}"))
    assert not (copy_runs / "teachers").exists()
    assert math.isfinite(outcome.student["test/top1"]) and outcome.student["epochs"] == 1
    spec = outcome.student_run.spec["teacher"]
    assert spec["source"] == "cache" and spec["run"] == teacher_run.name and len(spec["store"]) == 12
    assert outcome.teacher["test/top1"] == json.loads((teacher_run / "metrics.json").read_text())["test/top1"]


def test_adversarial_scheme_reads_the_store(cached: tuple[Path, Path, Path]) -> None:
    runs, _, _ = cached
    plan = plan_experiment(_config(runs, *FROM_STORE, "scheme=adversarial"))
    system = build_student_system(plan, ensure_teacher(plan)[0])
    batch = next(iter(plan.datamodule.ordered_train_dataloader()))
    assert all(torch.isfinite(v) for v in system.loss_terms(batch).values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.source=cache"], "data.augment=true draws a new random view"),
        ([*FROM_STORE, "method.name=fitnet"], "method 'fitnet' reads the teacher's features"),
        ([*FROM_STORE, "scheme=multi_teacher", "teachers=[{},{}]"], "scheme 'multi_teacher' calls its teachers"),
        (["teacher.source=cahce"], "unknown teacher.source 'cahce'; did you mean 'cache'?"),
        ([*FROM_STORE, "teacher.seed=7"], "no finished soft-label store at"),
        ([*FROM_STORE, "student.train.mix.mixup_alpha=0.2"], "not a soft-label store"),
    ],
)
def test_store_use_is_refused_with_the_reason(
    cached: tuple[Path, Path, Path], overrides: list[str], message: str
) -> None:
    runs, _, _ = cached
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        plan_experiment(_config(runs, *overrides))


def test_a_store_of_another_teacher_data_or_transform_is_refused(cached: tuple[Path, Path, Path]) -> None:
    runs, teacher_run, store = cached
    with pytest.raises(ConfigError, match=f"outputs of teacher run {teacher_run.name}, but this experiment's"):
        plan_experiment(_config(runs, *FROM_STORE, "teacher.seed=7", f"teacher.store={store}"))
    other_split, _ = cache_teacher_run(teacher_run, overrides=["data.val_fraction=0.2"])
    assert other_split != store
    with pytest.raises(ConfigError, match=r"other data \(data.val_fraction: store 0.2, run 0.1\)"):
        plan_experiment(_config(runs, *FROM_STORE, f"teacher.store={other_split}"))
    manifest_path = other_split / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["data"]["val_fraction"] = 0.1
    manifest["transform"] = "MNIST1DDataModule(augment=False) Normalize(...)"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="another training transform"):
        plan_experiment(_config(runs, *FROM_STORE, f"teacher.store={other_split}"))


def test_a_half_written_or_corrupted_store_is_never_used(tmp_path: Path) -> None:
    path = tmp_path / "stores" / "s"

    def failing() -> object:
        yield torch.randn(4, 3)
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_store(path, failing(), 8, 3, {})
    assert not path.exists() and list((tmp_path / "stores").iterdir()) == []
    with pytest.raises(ConfigError, match="not a finished soft-label store"):
        SoftLabelStore(path)
    write_store(path, [torch.randn(8, 3)], 8, 3, {})
    array = np.load(path / "logits.npy", mmap_mode="r+")
    array[0, 0] += 1
    array.flush()
    del array
    with pytest.raises(ConfigError, match=r"logits.npy does not match its manifest's sha256"):
        SoftLabelStore(path)


def test_rewriting_a_store_replaces_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "store"
    first, second = torch.randn(6, 4), torch.randn(6, 4)
    write_store(path, [first], 6, 4, {})
    write_store(path, [second[:4], second[4:]], 6, 4, {}, dtype="float32")
    assert torch.equal(SoftLabelStore(path).logits(torch.arange(6)), second)
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_topk_store_keeps_the_top_k_and_the_rest_mass_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 12, dtype=torch.float64) * 3
    k = 4
    write_store(tmp_path / "k", [logits], 5, 12, {}, top_k=k, dtype="float32")
    got = SoftLabelStore(tmp_path / "k").logits(torch.tensor([3, 0, 4])).double()
    for row, sample in zip(got, [3, 0, 4], strict=True):
        p_true = logits[sample].softmax(0)
        p_got = row.softmax(0)
        top = p_true.argsort(descending=True)[:k]
        rest = torch.ones(12, dtype=torch.bool)
        rest[top] = False
        assert torch.allclose(p_got[top], p_true[top], atol=1e-6)
        assert p_got[rest].sum().item() == pytest.approx(p_true[rest].sum().item(), abs=1e-6)
        assert torch.allclose(p_got[rest], p_got[rest].mean().expand(8), atol=1e-7)  # spread evenly
    write_store(tmp_path / "all", [logits], 5, 12, {}, top_k=12, dtype="float32")
    full = SoftLabelStore(tmp_path / "all").logits(torch.arange(5)).double()
    assert torch.allclose(F.log_softmax(full, 1), F.log_softmax(logits, 1), atol=1e-5)


def test_cache_command(cached: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, teacher_run, _ = cached
    out = tmp_path / "top3"
    assert main(["cache", str(teacher_run), "--top-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3600 samples x 10 classes, top-3 logits + rest mass" in printed and "bytes/sample" in printed
    assert SoftLabelStore(out).top_k == 3
    assert main(["cache", str(teacher_run), "--top-k", "11"]) == 2
    assert "--top-k must be between 1 and the class count 10, got 11" in capsys.readouterr().err
    assert main(["cache", str(teacher_run), "data.augment=true"]) == 2
    assert "data.augment=true draws a new random view" in capsys.readouterr().err
    assert main(["cache", str(runs)]) == 2
    assert "is not a kdlab run folder" in capsys.readouterr().err
    assert main(["cache", str(teacher_run), "--dataset", "mnist1dd"]) == 2
    assert "unknown dataset 'mnist1dd'; did you mean 'mnist1d'" in capsys.readouterr().err
