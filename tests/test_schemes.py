"""The offline scheme: frozen teacher, weighted loss terms, and a smoke test of every method.

The smoke test loops over the method registry, so a newly registered method is trained here
without touching this file: on one batch, a few optimiser steps (of its initialisation stage too,
where it has one) must lower its loss and keep every term finite, for an MNIST-1D CNN teacher ->
small CNN student and for resnet32x4 -> resnet8x4 on CIFAR-shaped images.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fakedata import accept_written_cifar, write_cifar100
from torchvision.datasets import CIFAR100

from kdlab.catalog import load_experiment
from kdlab.methods import METHODS
from kdlab.pipeline import Plan, build_student_system, plan_experiment

MNIST1D_PAIR = ("student.model.name=mnist1d_cnn", "student.model.kwargs.channels=8")
# The one exception to "defaults everywhere": with 40 images the repeated batch is a fifth of CRD's
# memory bank, so after two momentum updates its own rows come back as aligned negatives and the
# NCE loss rises before it falls (the reference computes the same numbers). A slow bank update keeps
# this one-batch check meaningful; tests/test_losses_contrastive.py checks CRD at its defaults.
ONE_BATCH_PARAMS = {"crd": ("method.params.nce_momentum=0.99",), "crd_kd": ("method.params.nce_momentum=0.99",)}


def _plan(tmp_path: Path, method: str, *overrides: str) -> Plan:
    return plan_experiment(
        load_experiment("mnist1d-kd", [f"method.name={method}", f"runtime.runs_dir={tmp_path}", *overrides])
    )


def _one_batch(plan: Plan) -> dict[str, torch.Tensor]:
    plan.datamodule.setup()
    return next(iter(plan.datamodule.train_dataloader()))


def _steps(system: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, label: str) -> None:
    """Optimise ``system`` on one batch; its total loss must fall and every term stay finite."""
    optimizer = system.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(steps):
        terms = system.loss_terms(batch)
        assert terms, f"{label}: no loss terms"
        assert all(torch.isfinite(term).all() for term in terms.values()), f"{label}: {terms}"
        loss = sum(system.term_weight(name) * term for name, term in terms.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    falling = losses[-1] < losses[0] and sum(losses[-3:]) < sum(losses[:3])
    assert falling, f"{label}: loss did not fall: {[round(v, 4) for v in losses]}"


def _calibrate_batchnorm(model: torch.nn.Module, inputs: torch.Tensor) -> None:
    """Give an untrained teacher the BatchNorm statistics of the batch, as training would: fresh
    running stats (mean 0, variance 1) in eval mode blow activations up layer after layer."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(inputs)
    model.eval()


def _smoke(plan: Plan, steps: int, label: str) -> None:
    teacher = plan.teacher if plan.teacher_run is not None else None
    batch = _one_batch(plan)
    if teacher is not None:
        _calibrate_batchnorm(teacher, batch["input"])
    if plan.method.init_epochs:
        _steps(build_student_system(plan, teacher, stage="init"), batch, steps, f"{label} (init stage)")
    system = build_student_system(plan, teacher)
    assert set(plan.weights) >= {"ce"}
    _steps(system, batch, steps, label)
    with torch.no_grad():
        assert torch.isfinite(system(batch["input"])).all()


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_on_mnist1d(tmp_path: Path, method: str) -> None:
    # A thinner student, except for methods that only fit equal widths (FSP): a same-width one.
    # (Every scheme with every method: tests/test_scheme_registry.py.)
    pair = ("student.model.name=mnist1d_cnn",) if METHODS.get(method).needs_equal_widths else MNIST1D_PAIR
    plan = _plan(tmp_path, method, *pair)
    _smoke(plan, 30, method)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_resnet32x4_to_resnet8x4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    write_cifar100(tmp_path, n_train=40, n_test=8)
    accept_written_cifar(monkeypatch, CIFAR100, tmp_path)
    cifar = (
        "data.name=cifar100",
        f"data.root={tmp_path}",
        "data.batch_size=8",
        "data.val_fraction=0",
        "teacher.model.name=resnet32x4",
        "student.model.name=resnet8x4",
        "teacher.calibration.method=none",
        "student.train.optimizer.name=sgd",
        "student.train.optimizer.lr=0.02",
    )
    plan = _plan(tmp_path, method, *cifar, *ONE_BATCH_PARAMS.get(method, ()))
    _smoke(plan, 8, f"{method} resnet32x4->resnet8x4")


def test_teacher_is_frozen_never_optimised_and_not_checkpointed(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "kd")
    system = build_student_system(plan, plan.teacher)
    teacher_params = {id(p) for p in plan.teacher.parameters()}
    optimised = {id(p) for group in system.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimised and not optimised & teacher_params
    assert {id(p) for p in plan.student.parameters()} <= optimised
    assert not any(p.requires_grad for p in plan.teacher.parameters())

    system.train()
    assert system.student.training and not system.teacher.training and not plan.teacher.training

    before = {k: v.clone() for k, v in plan.teacher.state_dict().items()}
    optimizer = system.configure_optimizers()["optimizer"]
    system.loss_terms(_one_batch(plan))["kd"].backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in plan.teacher.state_dict().items())

    state = system.state_dict()
    assert not any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state)
    system.load_state_dict(state)  # loads strictly although the teacher's weights are absent


def test_loss_is_the_weighted_sum_of_named_terms(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "kd")
    plan.weights = {"ce": 0.25, "kd": 2.0}
    system = build_student_system(plan, plan.teacher)
    batch = _one_batch(plan)
    terms = system.loss_terms(batch)
    logits = plan.student(batch["input"])
    with torch.no_grad():
        teacher_logits = plan.teacher(batch["input"])
    ce = torch.nn.functional.cross_entropy(logits, batch["target"])
    t = plan.method.temperature
    p_teacher = torch.softmax(teacher_logits / t, -1)
    kd = t * t * (p_teacher * (p_teacher.log() - torch.log_softmax(logits / t, -1))).sum(-1).mean()
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kd"], kd)


def test_zero_weight_skips_the_supervised_term(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "kd")
    plan.weights = {"ce": 0.0, "kd": 1.0}
    terms = build_student_system(plan, plan.teacher).loss_terms(_one_batch(plan))
    assert set(terms) == {"kd"}


def test_label_smoothing_reaches_the_supervised_term(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "ce", "student.train.label_smoothing=0.2")
    batch = _one_batch(plan)
    terms = build_student_system(plan, None).loss_terms(batch)
    logits = plan.student(batch["input"])
    log_p = torch.log_softmax(logits, -1)
    smoothed = 0.8 * -log_p.gather(1, batch["target"][:, None]).squeeze(1) + 0.2 * -log_p.mean(-1)
    torch.testing.assert_close(terms["ce"], smoothed.mean())
