"""Temperature callbacks: fixed schedules and CTKD's adversarial, curriculum-scaled temperature.

Each check runs a real Lightning Trainer on a tiny scheme of its own (a linear student, fixed
teacher logits, a registered method, ``extra_modules``) and compares with formulas written out here:
the schedules, the paper's cosine curriculum, and a float64 gradient of ``T^2 KL`` with respect to
the temperature logit computed without kdlab's loss or its gradient reversal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from kdlab.callbacks import CALLBACKS, CurriculumTemperature, TemperatureSchedule, create_callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdlab.errors import ConfigError, UnknownNameError
from kdlab.features import ModelOutput
from kdlab.methods import METHODS

FEATURES, CLASSES, SAMPLES, BATCH = 8, 5, 48, 16


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator)
    targets = torch.randint(0, CLASSES, (SAMPLES,), generator=generator)
    teacher_logits = 3 * torch.randn(SAMPLES, CLASSES, generator=generator)
    return TensorDataset(inputs, targets, teacher_logits)


class TinyScheme(L.LightningModule):
    """The scheme contract the callbacks rely on: ``.method`` and ``.extra_modules`` trained with the student."""

    def __init__(self, method: str = "kd", lr: float = 0.0, momentum: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(FEATURES, CLASSES)
        self.method = METHODS.get(method)()
        self.weights = dict(METHODS.get(method).default_weights)
        self.extra_modules = nn.ModuleDict()
        self.lr, self.momentum = lr, momentum
        self.seen: list[tuple[int, Any]] = []  # (epoch, method.temperature) inside training_step
        self.losses: list[float] = []
        self.logit_grads: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        inputs, targets, teacher_logits = batch
        logits = self.student(inputs)
        terms = self.method(ModelOutput(logits), ModelOutput(teacher_logits), {"input": inputs, "target": targets})
        terms["ce"] = F.cross_entropy(logits, targets)
        loss = sum(self.weights[name] * term for name, term in terms.items())
        self.seen.append((self.current_epoch, self.method.temperature))
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        if "ctkd" in self.extra_modules:
            self.logit_grads.append((self.current_epoch, self.extra_modules["ctkd"].logit.grad.clone()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [*self.student.parameters(), *self.extra_modules.parameters()]
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)


def _fit(
    scheme: TinyScheme,
    callback: L.Callback,
    epochs: int,
    batches: int | None = None,
    ckpt: Path | None = None,
    precision: str = "32-true",
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=batches,
        callbacks=[callback],
    )
    trainer.fit(scheme, DataLoader(_data(), batch_size=BATCH, shuffle=False), ckpt_path=ckpt)
    return trainer


def _value(temperature: float | torch.Tensor) -> float:
    return float(temperature.detach()) if isinstance(temperature, torch.Tensor) else temperature


def _epoch_temperatures(scheme: TinyScheme) -> dict[int, float]:
    values: dict[int, set[float]] = {}
    for epoch, temperature in scheme.seen:
        values.setdefault(epoch, set()).add(_value(temperature))
    assert all(len(v) == 1 for v in values.values()), f"temperature changed within an epoch: {values}"
    return {epoch: v.pop() for epoch, v in values.items()}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # linear over max_epochs = 5: epoch e -> 8 + (2 - 8) e / 5
        ({"start": 8, "end": 2}, [8 + (2 - 8) * e / 5 for e in range(5)]),
        # cosine over 3 epochs, then held at the end value
        (
            {"start": 8, "end": 2, "schedule": "cosine", "epochs": 3},
            [2 + 6 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)] + [2.0, 2.0],
        ),
        ({"start": 8, "end": 2, "schedule": "step", "milestones": [1, 3]}, [8.0, 5.0, 5.0, 2.0, 2.0]),
    ],
    ids=["linear", "cosine", "step"],
)
def test_schedule_sets_the_temperature_of_every_epoch(params: dict[str, Any], expected: list[float]) -> None:
    scheme = TinyScheme("dkd")
    trainer = _fit(scheme, create_callback("temperature_schedule", params), epochs=5, batches=2)
    assert _epoch_temperatures(scheme) == pytest.approx(dict(enumerate(expected)), rel=1e-12)
    assert float(trainer.callback_metrics["train/temperature"]) == pytest.approx(expected[-1], rel=1e-6)


def _paper_lambda(n: int, loops: int, lam_min: float = 0.0, lam_max: float = 1.0) -> float:
    """CTKD, Eq. (9): lambda_n = l_min + (l_max - l_min) (1 + cos((1 + min(n, E) / E) pi)) / 2."""
    return lam_min + 0.5 * (lam_max - lam_min) * (1 + math.cos((1 + min(n, loops) / loops) * math.pi))


def _plain_logit_gradient(scheme: TinyScheme, logit: float, t_start: float, t_range: float) -> float:
    """d loss / d logit on the first batch with an ordinary (non-reversed) T, all in float64."""
    inputs, _, teacher_logits = (t.double() for t in _data()[:BATCH])
    theta = torch.tensor(logit, dtype=torch.float64, requires_grad=True)
    temperature = t_start + t_range / (1 + torch.exp(-theta))
    student = inputs @ scheme.student.weight.double().T + scheme.student.bias.double()
    p_teacher = torch.softmax(teacher_logits / temperature, dim=1)
    log_ratio = torch.log_softmax(teacher_logits / temperature, dim=1) - torch.log_softmax(student / temperature, dim=1)
    kd = temperature**2 * (p_teacher * log_ratio).sum(dim=1).mean()
    (grad,) = torch.autograd.grad(scheme.weights["kd"] * kd, theta)  # CE does not depend on T
    return float(grad)


def test_ctkd_reverses_the_gradient_scaled_by_the_cosine_curriculum() -> None:
    # lr 0: weights and logit (0.5, exact in float32) stay put, so every epoch sees the same batch
    # and has the same plain gradient.
    # In float64 ("64-true" converts the scheme, the temperature module included): T^2 KL is a small
    # difference of large terms, and float32 would leave only about 3 significant digits to compare.
    callback = CurriculumTemperature(t_start=1.0, t_range=20.0, init_logit=0.5, curriculum_epochs=3)
    scheme = TinyScheme("kd")
    trainer = _fit(scheme, callback, epochs=5, batches=1, precision="64-true")
    plain = _plain_logit_gradient(scheme, 0.5, 1.0, 20.0)
    assert abs(plain) > 1e-3
    lambdas = [_paper_lambda(epoch + 1, 3) for epoch in range(5)]  # the authors count epochs from 1
    assert lambdas[:3] == pytest.approx([0.25, 0.75, 1.0]) and lambdas[3:] == pytest.approx([1.0, 1.0])
    assert [callback.strength(e) for e in range(5)] == pytest.approx(lambdas, rel=1e-12)
    assert [e for e, _ in scheme.logit_grads] == list(range(5))
    for epoch, grad in scheme.logit_grads:
        assert float(grad) == pytest.approx(-lambdas[epoch] * plain, rel=1e-9), f"epoch {epoch}"
    expected_t = 1.0 + 20.0 / (1 + math.exp(-0.5))
    assert _epoch_temperatures(scheme) == pytest.approx(dict.fromkeys(range(5), expected_t), rel=1e-6)
    assert all(isinstance(t, torch.Tensor) and t.ndim == 0 and t.requires_grad for _, t in scheme.seen)
    assert float(trainer.callback_metrics["train/ctkd_lambda"]) == pytest.approx(1.0)
    assert float(trainer.callback_metrics["train/temperature"]) == pytest.approx(expected_t, rel=1e-6)


def test_ctkd_trains_the_temperature_within_its_bounds() -> None:
    scheme = TinyScheme("kd", lr=0.5)
    trainer = _fit(scheme, create_callback("ctkd", {"curriculum_epochs": 2}), epochs=3)
    assert len(scheme.losses) == 3 * SAMPLES // BATCH
    assert all(math.isfinite(loss) for loss in scheme.losses)
    logit = scheme.extra_modules["ctkd"].logit
    assert float(logit.detach()) != 1.0  # the authors' initial logit
    temperatures = [_value(t) for _, t in scheme.seen]
    assert len(set(temperatures)) > 1
    assert all(1.0 <= t <= 21.0 for t in temperatures)
    assert float(trainer.callback_metrics["train/temperature"]) == pytest.approx(sum(temperatures[-3:]) / 3, rel=1e-6)


def test_ctkd_resumes_exactly(tmp_path: Path) -> None:
    """The logit and its momentum travel in the checkpoint; lambda needs nothing but the epoch."""
    straight = TinyScheme("kd", lr=0.5, momentum=0.9)
    _fit(straight, CurriculumTemperature(curriculum_epochs=3), epochs=4)
    first = TinyScheme("kd", lr=0.5, momentum=0.9)
    trainer = _fit(first, CurriculumTemperature(curriculum_epochs=3), epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    assert "extra_modules.ctkd.logit" in torch.load(tmp_path / "half.ckpt", weights_only=False)["state_dict"]
    resumed = TinyScheme("kd", lr=0.5, momentum=0.9)
    _fit(resumed, CurriculumTemperature(curriculum_epochs=3), epochs=4, ckpt=tmp_path / "half.ckpt")
    assert [e for e, _ in resumed.seen] == [2] * 3 + [3] * 3
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [_value(t) for _, t in straight.seen[-6:]] == [_value(t) for _, t in resumed.seen]


@pytest.mark.parametrize("method", ["at", "ce"])
@pytest.mark.parametrize("name", ["temperature_schedule", "ctkd"])
def test_method_without_temperature_fails_before_training(name: str, method: str) -> None:
    scheme = TinyScheme(method)
    callback = create_callback(name, {"start": 4, "end": 1} if name == "temperature_schedule" else {})
    with pytest.raises(ConfigError, match=rf"method '{method}' has no temperature") as error:
        _fit(scheme, callback, epochs=1)
    assert "(methods with one: crd_kd, dist, dkd, kd, ls_kd)" in str(error.value)
    assert not scheme.seen


def test_ctkd_needs_extra_modules_in_the_scheme() -> None:
    scheme = TinyScheme("kd")
    del scheme.extra_modules
    with pytest.raises(ConfigError, match="has no extra_modules"):
        _fit(scheme, CurriculumTemperature(), epochs=1)


@pytest.mark.parametrize(
    ("name", "params", "error", "message"),
    [
        ("ctdk", {}, UnknownNameError, r"unknown callback 'ctdk'; did you mean 'ctkd'\?"),
        ("temperature_schedule", {"start": 4, "end": 1, "schedule": "cosin"}, ConfigError, r"did you mean 'cosine'\?"),
        (
            "ctkd",
            {"t_strat": 2},
            ConfigError,
            r"unknown option 't_strat'; did you mean 't_start'.*\(valid: t_start, t_range,",
        ),
        ("ctkd", {"curriculum_epochs": "ten"}, ConfigError, r"'curriculum_epochs' must be int"),
        ("temperature_schedule", {"end": 1}, ConfigError, r"missing option\(s\) start"),
        ("temperature_schedule", {"start": 0, "end": 1}, ConfigError, r"start must be a positive temperature"),
        ("temperature_schedule", {"start": 4, "end": 1, "schedule": "step"}, ConfigError, r"needs milestones"),
        ("temperature_schedule", {"start": 4, "end": 1, "milestones": [2]}, ConfigError, r"only apply to .*'step'"),
        ("ctkd", {"t_range": -1}, ConfigError, r"must be positive"),
    ],
)
def test_bad_names_and_options(name: str, params: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        create_callback(name, params)


def test_registry() -> None:
    assert CALLBACKS.names() == ["ctkd", "temperature_schedule"]
    assert (
        CALLBACKS.get("ctkd") is CurriculumTemperature and CALLBACKS.get("temperature_schedule") is TemperatureSchedule
    )
    assert all(CALLBACKS.get(name).name == name for name in CALLBACKS)
