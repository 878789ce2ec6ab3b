"""Each scheme's loss against its paper's formula (float64 where it matters), and what it promises:
DML's peers, BYOT's exits, the adversarial discriminator, cross-modal inputs and labels, the
teacher-assistant chain, and callbacks configured in an experiment."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdlab.catalog import load_experiment
from kdlab.errors import KdlabError
from kdlab.pipeline import Plan, build_student_system, plan_experiment, run_experiment
from kdlab.schemes.adversarial import gradient_penalty

TINY = ["teacher.train.epochs=1", "student.train.epochs=2", "runtime.wandb=disabled", "runtime.progress=false"]


def _plan(tmp_path: Path, experiment: str, *overrides: str) -> Plan:
    return plan_experiment(load_experiment(experiment, [f"runtime.runs_dir={tmp_path}", *overrides]))


def _batch(plan: Plan) -> dict[str, torch.Tensor]:
    plan.datamodule.setup()
    return next(iter(plan.datamodule.train_dataloader()))


def _kl(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * batch-mean KL(p_teacher || p_student), written out."""
    p = (teacher.double() / temperature).softmax(-1)
    log_q = (student.double() / temperature).log_softmax(-1)
    return temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()


def test_dml_terms_are_ce_plus_mutual_kl(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "mnist1d-dml", "scheme_params.peers=3", "method.params.temperature=2.0")
    system = build_student_system(plan, None)
    batch = _batch(plan)
    terms = system.loss_terms(batch)
    logits = [model(batch["input"]) for model in system.models()]
    assert len(logits) == 3 and system.student is plan.student
    expected_ce = sum(F.cross_entropy(z.double(), batch["target"]) for z in logits)
    expected_kd = sum(_kl(logits[j], logits[i], 2.0) for i in range(3) for j in range(3) if i != j) / 2
    assert terms["ce"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    # peer 1 learns from its own terms only: the others' outputs are fixed targets for it
    peer = system.peers[0]
    (grad,) = torch.autograd.grad(terms["kd"], peer.fc.weight if hasattr(peer, "fc") else next(peer.parameters()))
    own = (_kl(logits[0].detach(), logits[1], 2.0) + _kl(logits[2].detach(), logits[1], 2.0)) / 2
    (expected,) = torch.autograd.grad(own, peer.fc.weight if hasattr(peer, "fc") else next(peer.parameters()))
    assert torch.allclose(grad.double(), expected.double(), atol=1e-6)
    assert set(system.eval_logits(batch)) == {"", "peer1", "peer2"}


def test_byot_exits_learn_from_the_deepest(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "mnist1d-byot")
    system = build_student_system(plan, None)
    assert len(system.exits) == 2  # three stages: an exit after the first two
    batch = _batch(plan)
    terms = system.loss_terms(batch)
    logits = system.student(batch["input"])
    stages = system.stage_taps.collect()["stages"]
    deepest = stages[-1].flatten(2).mean(-1)
    outputs = [head(stage) for head, stage in zip(system.exits, stages[:-1], strict=True)]
    kd = sum(_kl(logits.detach(), z, 3.0) for z, _ in outputs)
    hint = sum(((h.double() - deepest.double()) ** 2).mean() for _, h in outputs)
    exit_ce = sum(F.cross_entropy(z.double(), batch["target"]) for z, _ in outputs)
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["exit_feature"].item() == pytest.approx(hint.item(), rel=1e-5)
    assert terms["exit_ce"].item() == pytest.approx(exit_ce.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits, batch["target"]).item(), rel=1e-6)
    assert system.weights["exit_ce"] == 0.7 and system.weights["exit_feature"] == 0.03
    # the deepest exit is the teacher: the distillation terms never move the final classifier
    (grad,) = torch.autograd.grad(terms["kd"] + terms["exit_feature"], system.student.fc.weight, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    assert not any(k.startswith("exits") for k in system.export_model().state_dict())


def test_gradient_penalty_is_gulrajani() -> None:
    torch.manual_seed(0)
    critic = torch.nn.Linear(6, 1).double()
    real, fake = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    # a linear critic's gradient is its weight everywhere: the penalty is (||w|| - 1)^2
    expected = (critic.weight.norm() - 1) ** 2
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(expected.item(), rel=1e-12)


def test_adversarial_alternates_discriminator_and_student(tmp_path: Path) -> None:
    overrides = [*TINY, "scheme_params.gp_weight=1.0", "scheme_params.d_steps=2"]
    outcome = run_experiment(load_experiment("mnist1d-adversarial", [f"runtime.runs_dir={tmp_path}", *overrides]))
    rows = list(csv.DictReader((outcome.student_run.dir / "logs" / "attempt-1" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/d_loss", "train/d_acc", "train/adv", "train/kd", "train/ce"} <= logged
    accuracies = [float(r["train/d_acc"]) for r in rows if r.get("train/d_acc")]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    checkpoint = torch.load(outcome.student_run.last_checkpoint, weights_only=False)
    assert len(checkpoint["optimizer_states"]) == 2  # student and discriminator, both resumable
    assert any(k.startswith("discriminator.") for k in checkpoint["state_dict"])


def test_cross_modal_teacher_sees_its_modality_and_unlabelled_samples_get_no_ce(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "mnist1d-cross-modal", "data.kwargs.student_labels=0.5")
    teacher = plan.teacher
    assert teacher is not None
    system = build_student_system(plan, teacher)
    batch = _batch(plan)
    assert batch["input"].shape[1:] != batch["teacher_input"].shape[1:]
    teacher.eval()
    with torch.no_grad():
        assert torch.equal(system.teacher_outputs(batch)[0].logits, teacher(batch["teacher_input"]))
    terms = system.loss_terms(batch)
    logits = system.student(batch["input"]).double()
    labelled = batch["labelled"]
    assert 0 < labelled.sum() < len(labelled)
    expected = F.cross_entropy(logits[labelled], batch["target"][labelled])
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    unlabelled = _plan(tmp_path, "mnist1d-cross-modal")
    no_labels = build_student_system(unlabelled, unlabelled.teacher).loss_terms(_batch(unlabelled))
    assert no_labels["ce"].item() == 0.0 and no_labels["kd"].item() > 0


def test_cross_modal_needs_paired_data(tmp_path: Path) -> None:
    with pytest.raises(KdlabError, match="cross_modal needs paired data"):
        _plan(tmp_path, "mnist1d-zoo", "scheme=cross_modal")


@pytest.mark.slow
def test_assistant_chain_trains_each_link_once_and_dgkd_guides_with_all(tmp_path: Path) -> None:
    config = load_experiment("mnist1d-takd", [f"runtime.runs_dir={tmp_path}", *TINY])
    first = run_experiment(config)
    assert len(first.chain) == 1 and first.chain[0]["model"] == "mnist1d_cnn"
    link = Path(first.student_run.spec["chain"][0]["run"])
    assistants = list((tmp_path / "assistants").iterdir())
    assert len(assistants) == 1 and assistants[0].name == str(link)
    saved = torch.load(assistants[0] / "model.pt", weights_only=False)
    assert saved["kwargs"] == {"channels": 8}
    # another student on the same chain reuses the assistant
    smaller = ["student.model.name=mnist1d_cnn", "student.model.kwargs.channels=4"]
    other = run_experiment(load_experiment("mnist1d-takd", [f"runtime.runs_dir={tmp_path}", *TINY, *smaller]))
    assert other.chain[0] == first.chain[0] and other.student_run.dir != first.student_run.dir
    assert len(list((tmp_path / "assistants").iterdir())) == 1
    plan = plan_experiment(
        load_experiment("mnist1d-takd", [f"runtime.runs_dir={tmp_path}", *TINY, "scheme_params.dgkd=true"])
    )
    assert plan.chain[0].run.hash == assistants[0].name  # the first link has only the teacher before it
    system = build_student_system(plan, [plan.teacher, plan.chain[0].model])
    assert len(system.teachers) == 2 and len(system.guide_methods) == 1
    assert set(system.loss_terms(_batch(plan))) == {"ce", "kd"}


def test_callbacks_from_the_experiment_run_and_bad_ones_fail_first(tmp_path: Path) -> None:
    schedule = "callbacks=[{name: temperature_schedule, params: {start: 8.0, end: 2.0, schedule: linear}}]"
    outcome = run_experiment(load_experiment("mnist1d-zoo", [f"runtime.runs_dir={tmp_path}", *TINY, schedule]))
    rows = list(csv.DictReader((outcome.student_run.dir / "logs" / "attempt-1" / "metrics.csv").open()))
    temperatures = [float(r["train/temperature"]) for r in rows if r.get("train/temperature")]
    assert temperatures[:2] == pytest.approx([8.0, 5.0])
    with pytest.raises(KdlabError, match="did you mean 'ctkd'"):
        _plan(tmp_path, "mnist1d-zoo", "callbacks=[{name: ctdk}]")
    with pytest.raises(KdlabError, match="temperature"):
        _plan(tmp_path, "mnist1d-zoo", "method.name=at", "callbacks=[{name: ctkd}]")


@pytest.mark.parametrize(
    ("assistants", "message"),
    [
        ("[{kwargs: {channels: 8}}]", "stage 1 of the chain names no model"),
        ("[{name: mnist1d_cnn}]", "cycle: assistant 1 is the same model as teacher"),
        ("[{name: mnist1d_cnn, kwargs: {channels: 8}}, {name: mnist1d_cnn, kwargs: {channels: 8}}]", "cycle"),
        ("[{name: mnist1d_cnnn}]", "did you mean 'mnist1d_cnn'"),
        ("[]", "list at least one model"),
    ],
)
def test_broken_chains_fail_before_training(tmp_path: Path, assistants: str, message: str) -> None:
    with pytest.raises(KdlabError, match=message):
        _plan(tmp_path, "mnist1d-takd", f"scheme_params.assistants={assistants}")
    assert not (tmp_path / "assistants").exists()


def test_full_scale_rgbd_config_plans_on_paired_image_folders(tmp_path: Path) -> None:
    from test_paired_data import solid_pairs

    solid_pairs(tmp_path / "data", classes=tuple("abcdefghij"))
    small = ["data.kwargs.teacher_image_size=32", "data.kwargs.student_image_size=32", "data.num_workers=0"]
    plan = _plan(tmp_path, "rgbd-cross-modal", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.2", *small)
    batch = _batch(plan)
    assert batch["teacher_input"].shape[1] == 3 and batch["input"].shape[1] == 1
    assert plan.config.student.train.epochs == 90 and plan.teacher_input_key == "teacher_input"


def test_student_only_data_options_share_one_teacher(tmp_path: Path) -> None:
    runs = {
        fraction: _plan(tmp_path, "mnist1d-cross-modal", f"data.kwargs.student_labels={fraction}")
        for fraction in (0.0, 0.1, 1.0)
    }
    assert len({plan.teacher_run.hash for plan in runs.values()}) == 1
    assert len({plan.student_run.hash for plan in runs.values()}) == 3
