"""The offline scheme: frozen teacher, weighted loss terms, and a smoke test of every method.

The smoke test loops over the method registry, so a newly registered method is trained here
without touching this file: a few optimiser steps on one MNIST-1D batch must lower its loss and
keep every term finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.methods import METHODS
from kdlab.pipeline import Plan, build_student_system, plan_experiment
from kdlab.schemes import SCHEMES


def _plan(tmp_path: Path, method: str, *overrides: str) -> Plan:
    config = load_experiment("mnist1d-kd", [f"method.name={method}", f"runtime.runs_dir={tmp_path}", *overrides])
    config.method.params = {}  # each method's own defaults (mnist1d-kd sets KD's temperature)
    config.method.weights = {}
    return plan_experiment(config)


def _one_batch(plan: Plan) -> dict[str, torch.Tensor]:
    plan.datamodule.setup()
    return next(iter(plan.datamodule.train_dataloader()))


@pytest.mark.parametrize("scheme", SCHEMES.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_and_scheme_lowers_its_loss(tmp_path: Path, method: str, scheme: str) -> None:
    plan = _plan(tmp_path, method, f"scheme={scheme}")
    teacher = plan.teacher if plan.teacher_run is not None else None
    system = build_student_system(plan, teacher)
    optimizer = system.configure_optimizers()["optimizer"]
    batch = _one_batch(plan)
    losses = []
    for _ in range(30):
        terms = system.loss_terms(batch)
        assert set(terms) <= set(plan.weights), f"{method} returned terms without weights"
        assert all(torch.isfinite(term) for term in terms.values()), terms
        loss = sum(plan.weights[name] * term for name, term in terms.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], f"{method}/{scheme}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert torch.isfinite(system(batch["input"])).all()


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
    kd = (
        torch.nn.functional.kl_div(
            torch.log_softmax(logits / 4, -1), torch.softmax(teacher_logits / 4, -1), reduction="batchmean"
        )
        * 16
    )
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
