"""SAM / ASAM: one step equals the papers' two-gradient formula written out here with autograd; the
wrapper trains under Lightning's closure (each step logged once, BatchNorm moved once), resumes
from a checkpoint to the same weights, and bad settings fail before training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from kdlab.callbacks import EpochSeed
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.func import functional_call

from kdlab.catalog import load_experiment
from kdlab.config import DataConfig, OptimizerConfig, ScheduleConfig, TrainConfig, build_config
from kdlab.data import create_datamodule
from kdlab.errors import ConfigError
from kdlab.methods import METHODS
from kdlab.optim import build_optimizer
from kdlab.pipeline import plan_experiment
from kdlab.sam import SAM
from kdlab.schemes.base import SystemParts
from kdlab.schemes.offline import OfflineDistillation

LR, MOMENTUM, DECAY = 0.1, 0.9, 1e-3


def tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))


def hand_sam_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, eta: float | None, steps: int
) -> dict[str, torch.Tensor]:
    """The update rule from the papers with SGD (momentum, L2 decay) as the base, by autograd."""
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: torch.zeros_like(v) for n, v in w.items()}

    def grads(at: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        leaves = {n: v.clone().requires_grad_(True) for n, v in at.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (x,)), y)
        return list(torch.autograd.grad(loss, [leaves[n] for n in names]))

    for _ in range(steps):
        g = grads(w)
        if eta is None:  # SAM: e = rho g / ||g||
            norm = math.sqrt(sum(float((gi**2).sum()) for gi in g))
            e = [rho * gi / norm for gi in g]
        else:  # ASAM: e = rho T^2 g / ||T g||, T = |w| + eta
            t = [w[n].abs() + eta for n in names]
            norm = math.sqrt(sum(float(((ti * gi) ** 2).sum()) for ti, gi in zip(t, g, strict=True)))
            e = [rho * ti * ti * gi / norm for ti, gi in zip(t, g, strict=True)]
        g_sharp = grads({n: w[n] + ei for n, ei in zip(names, e, strict=True)})
        for n, gi in zip(names, g_sharp, strict=True):
            d = gi + DECAY * w[n]
            buffers[n] = d if _ == 0 else MOMENTUM * buffers[n] + d
            w[n] = w[n] - LR * buffers[n]
    return w


@pytest.mark.parametrize(("variant", "rho", "eta"), [("sam", 0.05, None), ("asam", 0.5, 0.01), ("asam", 0.3, 0.2)])
def test_one_and_two_steps_equal_the_papers_formula(variant: str, rho: float, eta: float | None) -> None:
    model, x, y = tiny_problem()
    expected = hand_sam_steps(model, x, y, rho, eta, steps=2)
    cfg = OptimizerConfig(lr=LR, momentum=MOMENTUM, weight_decay=DECAY, sam=variant, sam_rho=rho, asam_eta=eta or 0.01)
    optimizer = build_optimizer(model.parameters(), cfg)
    assert isinstance(optimizer, SAM) and optimizer.adaptive == (variant == "asam")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        optimizer.step(closure)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-10, atol=1e-12)


def test_paper_default_radius_per_variant() -> None:
    model, _, _ = tiny_problem()
    assert build_optimizer(model.parameters(), OptimizerConfig(sam="sam")).rho == 0.05  # type: ignore[attr-defined]
    assert build_optimizer(model.parameters(), OptimizerConfig(sam="asam")).rho == 0.5  # type: ignore[attr-defined]
    assert isinstance(build_optimizer(model.parameters(), OptimizerConfig()), torch.optim.SGD)


def test_step_without_closure_is_a_clear_error() -> None:
    model, _, _ = tiny_problem()
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(sam="sam"))
    with pytest.raises(RuntimeError, match="needs a closure"):
        optimizer.step()


def test_batchnorm_statistics_move_once_per_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2))
    x, y = torch.randn(16, 3) * 2 + 1, torch.randint(0, 2, (16,))
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(sam="sam"), model=model)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    norm = model[0]
    # One update from the initial (0, 1) with PyTorch's default momentum 0.1 and unbiased variance.
    torch.testing.assert_close(norm.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))
    assert int(norm.num_batches_tracked) == 1


def test_state_dict_is_the_base_optimisers_and_round_trips() -> None:
    model, x, y = tiny_problem()
    optimizer = build_optimizer(model.parameters(), OptimizerConfig(sam="asam"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scheduler.step()
    assert optimizer.base.param_groups[0]["lr"] == pytest.approx(0.025)  # type: ignore[attr-defined]
    saved = optimizer.state_dict()
    plain = torch.optim.SGD(model.parameters(), lr=1.0)
    plain.load_state_dict(saved)  # a plain SGD can read a SAM checkpoint
    fresh = build_optimizer(model.parameters(), OptimizerConfig(sam="asam"))
    fresh.load_state_dict(saved)
    assert fresh.param_groups is fresh.base.param_groups  # type: ignore[attr-defined]
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.025)
    for param in model.parameters():
        torch.testing.assert_close(fresh.state[param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])


# --- under Lightning -------------------------------------------------------------------------------


class Recorder(Callback):
    """Per epoch: samples the loss log summed and the BatchNorm batch count (before the module's
    own epoch-end hook resets the log)."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log = pl_module.loss_log  # type: ignore[attr-defined]
        self.counts.append(log.count)
        self.losses.append(float(log.sums["loss"]) / log.count)


def sam_system(epochs: int) -> tuple[OfflineDistillation, L.LightningDataModule]:
    datamodule = create_datamodule(DataConfig(batch_size=64, augment=False))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    train = TrainConfig(
        epochs=epochs,
        optimizer=OptimizerConfig(lr=0.05, sam="sam"),
        schedule=ScheduleConfig(name="cosine"),
    )
    parts = SystemParts(student=model, method=METHODS.get("ce")(), weights={"ce": 1.0}, train=train, num_classes=10)
    return OfflineDistillation(parts), datamodule


def fit(system: L.LightningModule, datamodule: L.LightningDataModule, root: Path, epochs: int, **kw: object) -> None:
    callbacks = [ModelCheckpoint(dirpath=root, filename="last", save_top_k=1), EpochSeed(0), *kw.pop("callbacks", [])]  # type: ignore[misc]
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(system, datamodule=datamodule, **kw)  # type: ignore[arg-type]


def test_lightning_fit_logs_each_step_once_and_resumes_exactly(tmp_path: Path) -> None:
    system, datamodule = sam_system(epochs=2)
    recorder = Recorder()
    fit(system, datamodule, tmp_path / "full", 2, callbacks=[recorder])
    train_size = len(datamodule.train_set)  # type: ignore[arg-type]
    steps = 2 * math.ceil(train_size / 64)
    assert recorder.counts == [train_size, train_size]  # not doubled by SAM's second pass
    assert all(math.isfinite(v) for v in recorder.losses) and recorder.losses[1] < recorder.losses[0]
    assert int(system.student[1].num_batches_tracked) == steps  # BatchNorm moved once per step
    assert system.trainer.global_step == steps

    first, datamodule = sam_system(epochs=2)
    fit(first, datamodule, tmp_path / "resumed", 1)
    resumed, datamodule = sam_system(epochs=2)
    fit(resumed, datamodule, tmp_path / "resumed", 2, ckpt_path=str(tmp_path / "resumed" / "last.ckpt"))
    for (name, expected), actual in zip(system.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)


# --- configuration ---------------------------------------------------------------------------------


def test_unknown_variant_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown optimizer.sam 'adam' \(valid: none, sam, asam\)"):
        build_config([], ["teacher.train.optimizer.sam=adam"])
    with pytest.raises(ConfigError, match="sam_rho must be positive"):
        build_config([], ["student.train.optimizer.sam_rho=0"])


def test_defaults_stay_out_of_run_specs(tmp_path: Path) -> None:
    base = plan_experiment(load_experiment("mnist1d-kd", [f"runtime.runs_dir={tmp_path}"]))
    sam = plan_experiment(
        load_experiment("mnist1d-kd", [f"runtime.runs_dir={tmp_path}", "teacher.train.optimizer.sam=sam"])
    )
    assert "sam" not in base.teacher_run.spec["train"]["optimizer"]
    assert sam.teacher_run.dir != base.teacher_run.dir and sam.student_run.dir != base.student_run.dir


def test_refused_with_manual_optimisation_and_fp16(tmp_path: Path) -> None:
    runs = f"runtime.runs_dir={tmp_path}"
    with pytest.raises(ConfigError, match=r"optimizer\.sam is not supported by this scheme"):
        plan_experiment(load_experiment("mnist1d-adversarial", [runs, "student.train.optimizer.sam=sam"]))
    with pytest.raises(ConfigError, match="precision '16-mixed'"):
        plan_experiment(
            load_experiment(
                "mnist1d-kd", [runs, "student.train.optimizer.sam=asam", "student.train.precision=16-mixed"]
            )
        )
