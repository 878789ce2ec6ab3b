"""DKD, DIST and logit-standardised KD against their papers' formulas, written out in float64 loops,
and the methods that use them (weights, warm-up, registry)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.config import MethodConfig
from kdlab.features import ModelOutput
from kdlab.losses.response import dist_loss, dkd_loss, kd_loss, standardize_logits, standardized_kd_loss
from kdlab.methods import METHODS, create_method


def _softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exp = [math.exp((v - top) / temperature) for v in row]
    return [v / sum(exp) for v in exp]


def _kl(q: list[float], p: list[float]) -> float:
    """KL(q || p) = sum_c q_c log(q_c / p_c), with 0 log 0 = 0."""
    return sum(qc * math.log(qc / pc) for qc, pc in zip(q, p, strict=True) if qc > 0)


def _logits(seed: int, batch: int, classes: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * scale
    return student, teacher


# --- DKD -------------------------------------------------------------------------------------------


def _paper_dkd(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, beta: float, temperature: float
) -> float:
    """Zhao et al.: T^2 * mean_b [alpha KL(b^T || b^S) + beta KL(p̂^T || p̂^S)], by loops.

    b = [p_t, 1 - p_t] is the target/non-target binary distribution; p̂ is the distribution over
    the non-target classes renormalised to sum to one."""
    total = 0.0
    for s_row, t_row, label in zip(student.tolist(), teacher.tolist(), target.tolist(), strict=True):
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        b_s, b_t = [p_s[label], 1 - p_s[label]], [p_t[label], 1 - p_t[label]]
        hat_s = [p / (1 - p_s[label]) for i, p in enumerate(p_s) if i != label]
        hat_t = [p / (1 - p_t[label]) for i, p in enumerate(p_t) if i != label]
        total += alpha * _kl(b_t, b_s) + beta * _kl(hat_t, hat_s)
    return temperature**2 * total / len(student)


@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 6.0, 1.0)])
@pytest.mark.parametrize("batch", [1, 6])
def test_dkd_loss_matches_the_paper_formula(alpha: float, beta: float, temperature: float, batch: int) -> None:
    student, teacher = _logits(batch + int(beta), batch, 7)
    target = torch.randint(0, 7, (batch,), generator=torch.Generator().manual_seed(batch))
    value = dkd_loss(student, teacher, target, alpha, beta, temperature)
    assert value.dtype == torch.float64
    expected = _paper_dkd(student, teacher, target, alpha, beta, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_dkd_defaults_are_mdistillers() -> None:
    student, teacher = _logits(0, 4, 5)
    target = torch.tensor([0, 1, 4, 2])
    expected = _paper_dkd(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0)
    assert dkd_loss(student, teacher, target).item() == pytest.approx(expected, rel=1e-10)


def test_dkd_reformulates_kd() -> None:
    """Zhao et al.: KD = TCKD + (1 - p_t^T) NCKD, so for one sample DKD with alpha = 1 and
    beta = 1 - p_t of the teacher is exactly KD."""
    student, teacher = _logits(3, 1, 6)
    target = torch.tensor([2])
    temperature = 4.0
    beta = 1 - torch.softmax(teacher / temperature, -1)[0, 2].item()
    dkd = dkd_loss(student, teacher, target, alpha=1.0, beta=beta, temperature=temperature)
    assert dkd.item() == pytest.approx(kd_loss(student, teacher, temperature).item(), rel=1e-10)


def test_dkd_is_zero_for_identical_logits_and_splits_into_its_parts() -> None:
    student, teacher = _logits(5, 4, 10)
    target = torch.tensor([1, 9, 0, 5])
    assert dkd_loss(student, student.clone(), target).item() == pytest.approx(0.0, abs=1e-12)
    tckd = dkd_loss(student, teacher, target, alpha=1.0, beta=0.0)
    nckd = dkd_loss(student, teacher, target, alpha=0.0, beta=1.0)
    assert tckd.item() > 0 and nckd.item() > 0
    both = dkd_loss(student, teacher, target, alpha=2.0, beta=3.0)
    assert both.item() == pytest.approx(2 * tckd.item() + 3 * nckd.item(), rel=1e-12)


def test_dkd_with_two_classes_has_no_non_target_part() -> None:
    """With two classes the non-target distribution is a single class: NCKD is zero."""
    student, teacher = _logits(6, 3, 2)
    target = torch.tensor([0, 1, 1])
    assert dkd_loss(student, teacher, target, alpha=0.0, beta=1.0).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_gradient_is_finite_and_leaves_teacher_alone() -> None:
    student, teacher = _logits(7, 5, 10)
    student.requires_grad_(True)
    dkd_loss(student, teacher, torch.arange(5)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dkd_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), temperature=0.0)


# --- DIST ------------------------------------------------------------------------------------------


def _pearson(u: list[float], v: list[float]) -> float:
    """Pearson's r with the reference's guard: cov / (sqrt(var_u) sqrt(var_v) + 1e-8), sums not means."""
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
    su = math.sqrt(sum((a - mu) ** 2 for a in u))
    sv = math.sqrt(sum((b - mv) ** 2 for b in v))
    return cov / (su * sv + 1e-8)


def _paper_dist(student: torch.Tensor, teacher: torch.Tensor, beta: float, gamma: float, temperature: float) -> float:
    """Huang et al.: tau^2 [beta mean_i (1 - r(Y_s[i,:], Y_t[i,:])) + gamma mean_j (1 - r(Y_s[:,j], Y_t[:,j]))]."""
    y_s = [_softmax(row, temperature) for row in student.tolist()]
    y_t = [_softmax(row, temperature) for row in teacher.tolist()]
    batch, classes = len(y_s), len(y_s[0])
    inter = sum(1 - _pearson(y_s[i], y_t[i]) for i in range(batch)) / batch
    columns = [([y_s[i][j] for i in range(batch)], [y_t[i][j] for i in range(batch)]) for j in range(classes)]
    intra = sum(1 - _pearson(s_col, t_col) for s_col, t_col in columns) / classes
    return temperature**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize(("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (1.0, 1.0, 4.0), (2.0, 0.5, 2.0)])
@pytest.mark.parametrize(("batch", "classes"), [(8, 5), (3, 10)])
def test_dist_loss_matches_the_paper_formula(
    beta: float, gamma: float, temperature: float, batch: int, classes: int
) -> None:
    student, teacher = _logits(batch * classes, batch, classes)
    value = dist_loss(student, teacher, beta, gamma, temperature)
    assert value.dtype == torch.float64
    expected = _paper_dist(student, teacher, beta, gamma, temperature)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-13)


def test_dist_defaults_are_beta_gamma_tau_one() -> None:
    student, teacher = _logits(11, 4, 6)
    expected = _paper_dist(student, teacher, 1.0, 1.0, 1.0)
    assert dist_loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


def test_dist_is_about_zero_for_identical_logits() -> None:
    """Not exactly zero: the reference adds 1e-8 to the norms' product, so r = n / (n + 1e-8)."""
    student, _ = _logits(12, 6, 10)
    value = dist_loss(student, student.clone(), temperature=4.0)
    assert 0 <= value.item() < 1e-4  # tau^2 * eps / (product of the centred norms)
    assert value.item() == pytest.approx(_paper_dist(student, student, 1.0, 1.0, 4.0), rel=1e-8, abs=1e-15)


def test_dist_is_invariant_to_shifting_logits_and_is_a_correlation() -> None:
    student, teacher = _logits(13, 5, 8)
    assert dist_loss(student + 3.0, teacher).item() == pytest.approx(dist_loss(student, teacher).item(), rel=1e-10)
    # each relation is 1 - r with r in [-1, 1]
    inter = dist_loss(student, teacher, beta=1.0, gamma=0.0).item()
    intra = dist_loss(student, teacher, beta=0.0, gamma=1.0).item()
    assert 0 <= inter <= 2 and 0 <= intra <= 2


def test_dist_batch_of_one_has_a_constant_intra_class_term() -> None:
    """The intra-class Pearson over a batch of one compares constant (length-1) vectors: the
    reference's eps makes r = 0, so the term is tau^2 * gamma, with zero gradient."""
    student, teacher = _logits(14, 1, 6)
    student.requires_grad_(True)
    intra = dist_loss(student, teacher, beta=0.0, gamma=1.0, temperature=4.0)
    assert intra.item() == pytest.approx(16.0, abs=1e-12)
    intra.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    # the inter-class term is still defined and trains the student
    student.grad = None
    total = dist_loss(student, teacher, temperature=4.0)
    assert total.item() == pytest.approx(_paper_dist(student.detach(), teacher, 1.0, 1.0, 4.0), rel=1e-10)
    total.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_dist_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        dist_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=-1.0)


# --- logit standardisation -------------------------------------------------------------------------


def _zscore(row: list[float]) -> list[float]:
    """(z - mean) / (1e-7 + std), std with Bessel's correction as torch.std (Sun et al.'s code)."""
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (1e-7 + std) for v in row]


def _paper_ls_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=True):
        p_s = _softmax(_zscore(s_row), temperature)
        p_t = _softmax(_zscore(t_row), temperature)
        total += _kl(p_t, p_s)
    return temperature**2 * total / len(student)


def test_standardize_logits_matches_the_z_score() -> None:
    student, _ = _logits(20, 4, 9)
    expected = torch.tensor([_zscore(row) for row in student.tolist()], dtype=torch.float64)
    torch.testing.assert_close(standardize_logits(student), expected, rtol=1e-12, atol=1e-12)
    z = standardize_logits(student)
    torch.testing.assert_close(z.mean(-1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(-1), torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_standardized_kd_loss_matches_the_paper_formula(temperature: float, batch: int) -> None:
    student, teacher = _logits(batch * 10 + int(temperature), batch, 7)
    value = standardized_kd_loss(student, teacher, temperature)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_paper_ls_kd(student, teacher, temperature), rel=1e-10, abs=1e-13)


def test_standardized_kd_ignores_the_students_logit_range() -> None:
    """The point of the paper: a student whose logits are a scaled, shifted copy of the teacher's
    is already perfect (plain KD still penalises it)."""
    _, teacher = _logits(21, 4, 10)
    student = 0.2 * teacher + 1.5
    assert standardized_kd_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-10)
    assert kd_loss(student, teacher, 2.0).item() > 0.1
    other, _ = _logits(22, 4, 10)
    assert standardized_kd_loss(3 * other - 2, teacher).item() == pytest.approx(
        standardized_kd_loss(other, teacher).item(), rel=1e-6
    )


def test_standardized_kd_default_temperature_is_two() -> None:
    student, teacher = _logits(23, 3, 5)
    assert standardized_kd_loss(student, teacher).item() == pytest.approx(
        _paper_ls_kd(student, teacher, 2.0), rel=1e-10
    )


# --- methods ---------------------------------------------------------------------------------------


def _outputs(batch: int = 4, classes: int = 10) -> tuple[ModelOutput, ModelOutput, dict[str, torch.Tensor]]:
    student, teacher = _logits(30, batch, classes)
    data = {"input": torch.zeros(batch, 1), "target": torch.arange(batch) % classes, "index": torch.arange(batch)}
    return ModelOutput(student), ModelOutput(teacher), data


@pytest.mark.parametrize(
    ("name", "weights", "params"),
    [
        ("dkd", {"ce": 1.0, "dkd": 1.0}, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}),
        ("dist", {"ce": 1.0, "dist": 2.0}, {"beta": 1.0, "gamma": 1.0, "temperature": 4.0}),
        ("ls_kd", {"ce": 0.1, "ls_kd": 9.0}, {"temperature": 2.0}),
    ],
)
def test_methods_have_the_reference_defaults_and_return_their_terms(
    name: str, weights: dict[str, float], params: dict[str, float]
) -> None:
    cls = METHODS.get(name)
    assert dict(cls.default_weights) == weights
    assert cls.student_taps == () and cls.teacher_taps == ()
    method = create_method(MethodConfig(name=name))
    assert {k: getattr(method, k) for k in params} == params
    terms = method(*_outputs())
    assert set(terms) == set(weights) - {"ce"}
    assert all(term.ndim == 0 and torch.isfinite(term) for term in terms.values())


def test_method_terms_are_their_loss_functions() -> None:
    student, teacher, batch = _outputs()
    s, t = student.logits, teacher.logits
    dkd = create_method(MethodConfig(name="dkd", params={"beta": 6.0, "warmup": 0}))
    torch.testing.assert_close(dkd(student, teacher, batch)["dkd"], dkd_loss(s, t, batch["target"], 1.0, 6.0, 4.0))
    dist = create_method(MethodConfig(name="dist", params={"temperature": 1.0}))
    torch.testing.assert_close(dist(student, teacher, batch)["dist"], dist_loss(s, t, 1.0, 1.0, 1.0))
    ls = create_method(MethodConfig(name="ls_kd", params={"temperature": 3.0}))
    torch.testing.assert_close(ls(student, teacher, batch)["ls_kd"], standardized_kd_loss(s, t, 3.0))


@pytest.mark.parametrize(
    ("epoch", "factor"), [(0, 1 / 20), (10, 11 / 20), (18, 19 / 20), (19, 1.0), (20, 1.0), (30, 1.0)]
)
def test_dkd_warm_up_follows_mdistiller(epoch: int, factor: float) -> None:
    """mdistiller scales DKD by min(epoch / 20, 1) with epochs counted from 1; kdlab's self.epoch
    counts from 0 (Lightning's current_epoch), so kdlab epoch e is mdistiller epoch e + 1."""
    student, teacher, batch = _outputs()
    method = create_method(MethodConfig(name="dkd"))
    method.epoch = epoch
    assert method.warmup_factor() == pytest.approx(factor, rel=1e-15)
    full = dkd_loss(student.logits, teacher.logits, batch["target"])
    torch.testing.assert_close(method(student, teacher, batch)["dkd"], factor * full)


def test_dkd_without_warm_up_uses_the_full_term_from_the_start() -> None:
    method = create_method(MethodConfig(name="dkd", params={"warmup": 0}))
    assert method.warmup_factor() == 1.0


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dkd", {"temperature": 0.0}, "temperature"),
        ("dkd", {"warmup": -1}, "warmup"),
        ("dist", {"temperature": -2.0}, "temperature"),
        ("ls_kd", {"temperature": 0.0}, "temperature"),
    ],
)
def test_methods_reject_bad_hyper_parameters(name: str, params: dict[str, float], message: str) -> None:
    from kdlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        create_method(MethodConfig(name=name, params=params))
