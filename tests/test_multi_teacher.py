"""Multi-teacher: the weightings and combinations against their formulas, the vectorised forward
against a loop, and per-teacher methods with their own adapters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdlab.catalog import load_experiment
from kdlab.errors import ConfigError, KdlabError
from kdlab.models import create_model
from kdlab.pipeline import build_student_system, plan_experiment
from kdlab.schemes import FrozenTeacher
from kdlab.schemes.ensemble import TeacherEnsemble, combine_logits, teacher_weights


def _logits(k: int = 3, b: int = 5, c: int = 4) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(k, b, c, dtype=torch.float64) * 3


def test_confidence_weights_are_ca_mkd() -> None:
    logits, target = _logits(), torch.tensor([0, 1, 2, 3, 0])
    weights = teacher_weights(logits, target, "confidence")
    for b in range(5):
        losses = [
            -math.log(math.exp(logits[k, b, target[b]]) / sum(math.exp(v) for v in logits[k, b])) for k in range(3)
        ]
        soft = [math.exp(v) / sum(math.exp(u) for u in losses) for v in losses]
        for k in range(3):
            assert weights[k, b].item() == pytest.approx((1 - soft[k]) / 2, rel=1e-12)
    assert torch.allclose(weights.sum(0), torch.ones(5, dtype=torch.float64))
    # the teacher with the lowest CE on a sample weighs most there
    ce = torch.stack([torch.nn.functional.cross_entropy(z, target, reduction="none") for z in logits])
    assert torch.equal(weights.argmax(0), ce.argmin(0))


def test_entropy_weights_favour_confident_teachers() -> None:
    logits = _logits()
    weights = teacher_weights(logits, torch.zeros(5, dtype=torch.long), "entropy", temperature=2.0)
    for b in range(5):
        entropies = []
        for k in range(3):
            p = [math.exp(v / 2) for v in logits[k, b].tolist()]
            p = [v / sum(p) for v in p]
            entropies.append(-sum(v * math.log(v) for v in p))
        expected = [math.exp(-h) / sum(math.exp(-g) for g in entropies) for h in entropies]
        assert weights[:, b].tolist() == pytest.approx(expected, rel=1e-12)


def test_fixed_and_equal_weights() -> None:
    logits = _logits()
    fixed = teacher_weights(logits, torch.zeros(5, dtype=torch.long), "fixed", [1.0, 1.0, 2.0])
    assert fixed[:, 0].tolist() == pytest.approx([0.25, 0.25, 0.5])
    equal = teacher_weights(logits, torch.zeros(5, dtype=torch.long), "equal")
    assert torch.allclose(equal, torch.full((3, 5), 1 / 3, dtype=torch.float64))


def test_probability_average_is_exact_at_its_temperature() -> None:
    logits, temperature = _logits(), 4.0
    weights = teacher_weights(logits, torch.zeros(5, dtype=torch.long), "fixed", [0.2, 0.3, 0.5])
    combined = combine_logits(logits, weights, "probs", temperature)
    mixture = sum(w * torch.softmax(z / temperature, -1) for w, z in zip([0.2, 0.3, 0.5], logits, strict=True))
    assert torch.allclose(torch.softmax(combined / temperature, -1), mixture, atol=1e-12)
    averaged = combine_logits(logits, weights, "logits")
    assert torch.allclose(averaged, 0.2 * logits[0] + 0.3 * logits[1] + 0.5 * logits[2])
    # one teacher: its own distribution back
    single = combine_logits(logits[:1], torch.ones(1, 5, dtype=torch.float64), "probs", temperature)
    assert torch.allclose(torch.softmax(single / temperature, -1), torch.softmax(logits[0] / temperature, -1))


@pytest.mark.parametrize(("name", "shape"), [("mnist1d_cnn", (6, 40)), ("resnet8", (4, 3, 32, 32))])
def test_vectorised_teachers_equal_a_loop(name: str, shape: tuple[int, ...]) -> None:
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_model(name, num_classes=10)
        with torch.no_grad():  # distinct BatchNorm statistics, as trained teachers have
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        models.append(model)
    taps = ("embedding", "stages")
    frozen = [FrozenTeacher(m, taps, temperature=t) for m, t in zip(models, [1.0, 2.0, 1.0], strict=True)]
    inputs = torch.randn(*shape)
    stacked = TeacherEnsemble(frozen, taps, vectorize=True)
    looped = TeacherEnsemble(frozen, taps, vectorize=False)
    assert len(stacked.stacked) == 1 and len(looped.stacked) == 0
    for fast, slow in zip(stacked(inputs), looped(inputs), strict=True):
        assert torch.allclose(fast.logits, slow.logits, atol=1e-5)
        assert torch.allclose(fast.features["embedding"], slow.features["embedding"], atol=1e-5)
        for a, b in zip(fast.features["stages"], slow.features["stages"], strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    # the stacked weights follow the system but never enter its checkpoint
    assert not any("stacked" in key for key in stacked.state_dict())


def _plan(tmp_path: Path, *overrides: str):
    base = [f"runtime.runs_dir={tmp_path}", "student.model.kwargs.channels=8"]
    return plan_experiment(load_experiment("mnist1d-multi-teacher", [*base, *overrides]))


def test_mixed_architectures_and_per_teacher_adapters(tmp_path: Path) -> None:
    plan = _plan(
        tmp_path,
        "method.name=fitnet",
        "scheme_params.combine=per_teacher",
        "scheme_params.weighting=confidence",
        "teachers=[{},{},{model: {kwargs: {channels: 32}}}]",
    )
    assert [t.seed for t in plan.teachers] == [0, 1, 2]
    assert len({t.run.hash for t in plan.teachers}) == 3
    system = build_student_system(plan, [t.model for t in plan.teachers])
    assert [len(g) for g in system.ensemble.groups] == [2, 1]
    regressors = [system.method.regressor, *[m.regressor for m in system.teacher_methods]]
    assert [r.conv.out_channels for r in regressors] == [25, 25, 32]  # one adapter per teacher width
    optimised = {id(p) for group in system.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert all(id(p) in optimised for r in regressors for p in r.parameters())
    assert not any(id(p) in optimised for t in plan.teachers for p in t.model.parameters())
    plan.datamodule.setup()
    batch = next(iter(plan.datamodule.train_dataloader()))
    terms = system.loss_terms(batch)
    assert set(terms) == {"ce", "hint"} and all(torch.isfinite(v) for v in terms.values())
    assert sum(float(system.diagnostics[f"teacher{k}_weight"]) for k in range(3)) == pytest.approx(1.0)


def test_bad_multi_teacher_options_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="combine=per_teacher"):
        _plan(tmp_path, "method.name=at")
    with pytest.raises(ConfigError, match="unknown weighting 'confidense'"):
        _plan(tmp_path, "scheme_params.weighting=confidense")
    with pytest.raises(ConfigError, match="2 fixed weights for 3 teachers"):
        _plan(tmp_path, "scheme_params.weighting=fixed", "scheme_params.weights=[1,2]")
    with pytest.raises(ConfigError, match="has no option 'combin'; did you mean 'combine'"):
        _plan(tmp_path, "scheme_params.combin=logits")
    with pytest.raises(ConfigError, match="takes one teacher but 'teachers' lists 2; use scheme=multi_teacher"):
        plan_experiment(load_experiment("mnist1d-zoo", [f"runtime.runs_dir={tmp_path}", "teachers=[{},{}]"]))


@pytest.mark.parametrize("combine", ["probs", "logits", "per_teacher"])
def test_one_teacher_reproduces_single_teacher_kd(tmp_path: Path, combine: str) -> None:
    multi = _plan(tmp_path, "teachers=[{}]", f"scheme_params.combine={combine}")
    single = plan_experiment(
        load_experiment("mnist1d-zoo", [f"runtime.runs_dir={tmp_path}", "student.model.kwargs.channels=8"])
    )
    assert multi.teacher_run.hash == single.teacher_run.hash  # the very same teacher run
    torch.manual_seed(0)
    teacher = multi.teacher
    assert teacher is not None
    single.student.load_state_dict(multi.student.state_dict())
    batch = _batch(multi)
    expected = build_student_system(single, single.teacher).loss_terms(batch)
    got = build_student_system(multi, teacher).loss_terms(batch)
    assert set(got) == set(expected) == {"ce", "kd"}
    for name in expected:
        assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-6, abs=1e-7)


def _batch(plan):
    plan.datamodule.setup()
    return next(iter(plan.datamodule.train_dataloader()))


def test_teacher_lists_that_cannot_work_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs a 'teachers' list"):
        _plan(tmp_path, "teachers=[]")
    with pytest.raises(KdlabError, match="num_classes mismatch: teacher 1 outputs 5 classes"):
        _plan(tmp_path, "teachers=[{}, {model: {kwargs: {num_classes: 5}}}]")
    with pytest.raises(KdlabError, match=r"teachers\[1\]"):
        _plan(tmp_path, "teachers=[{}, {modle: {}}]")
