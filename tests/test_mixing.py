"""Mixup / CutMix: what a mixed batch must be (checked against the papers' definitions written out
here), the cross-entropy on it with label smoothing (timm's folded targets, by hand), training with
it (and with SAM, which must see one mix per step), and the combinations refused before training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from kdlab.catalog import load_experiment
from kdlab.config import DataConfig, MixConfig, OptimizerConfig, TrainConfig
from kdlab.data import create_datamodule
from kdlab.errors import ConfigError
from kdlab.methods import METHODS
from kdlab.mixing import BatchMixer
from kdlab.pipeline import plan_experiment, run_experiment
from kdlab.schemes.base import SystemParts
from kdlab.schemes.offline import OfflineDistillation

CLASSES = 10


def batch_of(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    # Distinct labels, so every sample's partner (the batch reversed) has another class.
    return {"input": inputs, "target": torch.arange(len(inputs)), "index": torch.arange(len(inputs))}


def own_share(batch: dict[str, torch.Tensor], mixed: dict[str, torch.Tensor]) -> float:
    """lam: the probability the mixed target gives sample 0's own class."""
    return float(mixed["target"][0, int(batch["target"][0])])


def expected_target(target: torch.Tensor, lam: float) -> torch.Tensor:
    one_hot = torch.zeros(len(target), CLASSES)
    one_hot[torch.arange(len(target)), target] = 1.0
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


@pytest.mark.parametrize("shape", [(6, 3, 8, 8), (6, 40), (5, 40)])
def test_mixup_is_a_convex_combination_with_the_reversed_batch(shape: tuple[int, ...]) -> None:
    np.random.seed(0)
    batch = batch_of(torch.randn(*shape))
    mixed = BatchMixer(MixConfig(mixup_alpha=1.0), CLASSES)(batch)  # type: ignore[arg-type]
    lam = own_share(batch, mixed)
    assert 0 < lam < 1
    x = batch["input"]
    torch.testing.assert_close(mixed["input"], lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(mixed["target"], expected_target(batch["target"], lam))
    assert torch.equal(batch["input"], x)  # the loader's tensor is not changed in place


def test_image_cutmix_pastes_one_box_and_lam_is_its_complement() -> None:
    np.random.seed(2)  # a draw whose box is not clipped away (seed 1's is)
    batch = batch_of(torch.randn(4, 3, 16, 16))
    mixed = BatchMixer(MixConfig(cutmix_alpha=1.0), CLASSES)(batch)  # type: ignore[arg-type]
    x, out = batch["input"], mixed["input"]
    pasted = (out == x.flip(0)) & (out != x)
    box = pasted[0, 0]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert len(rows) and len(cols)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert torch.equal(box, inside)  # one rectangle, the same in every sample and channel
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    lam = 1 - int(inside.sum()) / 256
    torch.testing.assert_close(mixed["target"], expected_target(batch["target"], lam))


def test_odd_image_batch_leaves_the_last_sample_unmixed() -> None:
    np.random.seed(0)
    batch = batch_of(torch.randn(5, 3, 8, 8))
    mixed = BatchMixer(MixConfig(mixup_alpha=1.0), CLASSES)(batch)  # type: ignore[arg-type]
    assert torch.equal(mixed["input"][4], batch["input"][4])
    assert mixed["target"][4].tolist() == [0.0] * 4 + [1.0] + [0.0] * 5
    lam = own_share(batch, mixed)
    torch.testing.assert_close(mixed["input"][0], lam * batch["input"][0] + (1 - lam) * batch["input"][3])


def test_signal_cutmix_swaps_one_contiguous_segment() -> None:
    np.random.seed(3)
    batch = batch_of(torch.randn(6, 40))
    mixed = BatchMixer(MixConfig(cutmix_alpha=1.0), CLASSES)(batch)  # type: ignore[arg-type]
    x, out = batch["input"], mixed["input"]
    swapped = (out != x).any(0)
    where = swapped.nonzero().flatten()
    lo, hi = int(where.min()), int(where.max()) + 1
    assert torch.equal(out[:, lo:hi], x.flip(0)[:, lo:hi])
    assert torch.equal(out[:, :lo], x[:, :lo]) and torch.equal(out[:, hi:], x[:, hi:])
    torch.testing.assert_close(mixed["target"], expected_target(batch["target"], 1 - (hi - lo) / 40))


def test_prob_zero_never_mixes_and_both_alphas_switch() -> None:
    np.random.seed(0)
    batch = batch_of(torch.randn(6, 40))
    never = BatchMixer(MixConfig(mixup_alpha=1.0, prob=0.0), CLASSES)(batch)  # type: ignore[arg-type]
    assert torch.equal(never["input"], batch["input"]) and own_share(batch, never) == 1.0
    both = BatchMixer(MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0), CLASSES)
    kinds = set()
    for _ in range(20):
        out = both(batch)["input"]  # type: ignore[arg-type]
        changed = (out != batch["input"]).any(0)
        kinds.add("cutmix" if not changed.all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


def supervised_scheme(train: TrainConfig, method: str = "ce") -> OfflineDistillation:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    parts = SystemParts(student=model, method=METHODS.get(method)(), weights={"ce": 1.0}, train=train, num_classes=10)
    return OfflineDistillation(parts)


def test_cross_entropy_on_mixed_targets_folds_label_smoothing_like_timm() -> None:
    eps, lam = 0.1, 0.7
    scheme = supervised_scheme(TrainConfig(label_smoothing=eps))
    logits = torch.randn(4, CLASSES)
    hard = torch.tensor([1, 2, 3, 4])
    off, on = eps / CLASSES, 1 - eps + eps / CLASSES  # timm's mixup_target with smoothing
    smooth = torch.full((4, CLASSES), off)
    smooth[torch.arange(4), hard] = on
    folded = lam * smooth + (1 - lam) * smooth.flip(0)
    expected = -(folded * logits.log_softmax(-1)).sum(-1).mean()
    batch = {"input": torch.zeros(4, 40), "target": expected_target(hard, lam), "index": torch.arange(4)}
    torch.testing.assert_close(scheme.supervised_ce(logits, batch), expected)  # type: ignore[arg-type]


class MixCounter:
    def __init__(self, mixer: BatchMixer) -> None:
        self.mixer, self.calls = mixer, 0

    def __call__(self, batch: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.mixer(batch, key)  # type: ignore[arg-type,return-value]


def test_training_with_mix_and_sam_mixes_once_per_step(tmp_path: Path) -> None:
    train = TrainConfig(
        epochs=1, optimizer=OptimizerConfig(sam="sam"), mix=MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0)
    )
    scheme = supervised_scheme(train)
    counter = MixCounter(scheme.mixer)  # type: ignore[arg-type]
    scheme.mixer = counter  # type: ignore[assignment]
    seen: list[torch.Tensor] = []
    original = scheme.loss_terms

    def loss_terms(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append(batch["input"])
        return original(batch)  # type: ignore[arg-type]

    scheme.loss_terms = loss_terms  # type: ignore[method-assign]
    datamodule = create_datamodule(DataConfig(batch_size=256))
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(scheme, datamodule=datamodule)
    steps = trainer.global_step
    assert counter.calls == steps and len(seen) == 2 * steps
    assert all(seen[2 * i] is seen[2 * i + 1] for i in range(steps))  # both SAM passes: one mix
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_pipeline_trains_a_teacher_with_mix_sam_and_a_student_with_mix(tmp_path: Path) -> None:
    overrides = [
        f"runtime.runs_dir={tmp_path}",
        "runtime.wandb=disabled",
        "runtime.progress=false",
        "teacher.train.epochs=1",
        "student.train.epochs=1",
        "teacher.train.optimizer.sam=asam",
        "teacher.train.mix.mixup_alpha=0.2",
        "teacher.train.label_smoothing=0.1",
        "student.train.mix.cutmix_alpha=1.0",
    ]
    outcome = run_experiment(load_experiment("mnist1d-kd", overrides))
    assert outcome.teacher["test/top1"] > 20 and outcome.student["test/top1"] > 10  # chance: 10
    spec = outcome.teacher_run.spec["train"]
    assert spec["mix"]["mixup_alpha"] == 0.2 and spec["optimizer"]["sam"] == "asam"
    assert "mix" not in plan_experiment(load_experiment("mnist1d-kd", overrides[:3])).teacher_run.spec["train"]


def test_mixing_is_refused_where_labels_or_inputs_would_not_match(tmp_path: Path) -> None:
    runs = f"runtime.runs_dir={tmp_path}"
    with pytest.raises(ConfigError, match="cannot be used with method 'dkd'"):
        plan_experiment(load_experiment("mnist1d-kd", [runs, "method.name=dkd", "student.train.mix.mixup_alpha=0.2"]))
    with pytest.raises(ConfigError, match="runs its own training step"):
        plan_experiment(load_experiment("mnist1d-adversarial", [runs, "student.train.mix.mixup_alpha=0.2"]))
    with pytest.raises(ConfigError, match=r"mix\.prob"):
        load_experiment("mnist1d-kd", [runs, "student.train.mix.prob=1.5"])
