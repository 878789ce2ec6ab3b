"""Token-level LM distillation losses against their papers' formulas (float64, loops over the vocabulary),
their hand-written gradients against autograd, and the chunked form's peak memory against the naive one."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kdlab.errors import ConfigError
from kdlab.losses.lm import (
    LM_LOSSES,
    forward_kl,
    generalized_jsd,
    lm_loss,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tvd,
)

B, T, V = 3, 5, 11
# (name, params): every loss, the parametrised ones at a default and an off-default value.
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("generalized_jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"alpha": 0.1}),
    ("skew_forward_kl", {"alpha": 0.6}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.6}),
    ("tvd", {}),
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in params.items())}" for name, params in CASES]


def _inputs(seed: int = 0, scale: float = 2.0, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(B, T, V, generator=generator, dtype=torch.float64) * scale
    mask = torch.rand(B, T, generator=generator) > 0.3
    mask[1] = False  # a fully masked sequence
    mask[0, 0] = True
    return student.to(dtype), teacher.to(dtype), mask


# --- the papers' formulas, one token at a time ------------------------------------------------------


def _softmax(row: list[float], temperature: float) -> list[float]:
    top = max(row)
    exp = [math.exp((v - top) / temperature) for v in row]
    return [v / sum(exp) for v in exp]


def _kl(a: list[float], b: list[float]) -> float:
    """KL(a || b) = sum_v a_v log(a_v / b_v)."""
    return sum(av * math.log(av / bv) for av, bv in zip(a, b, strict=True) if av > 0)


def _mix(weight: float, a: list[float], b: list[float]) -> list[float]:
    return [weight * av + (1 - weight) * bv for av, bv in zip(a, b, strict=True)]


def _token_divergence(name: str, params: dict, p: list[float], q: list[float]) -> float:
    """p is the teacher's distribution, q the student's."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "generalized_jsd":  # GKD eq. 1, TRL's convention: m = beta p + (1 - beta) q
        beta = params["beta"]
        m = _mix(beta, p, q)
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_forward_kl":  # DistiLLM: KL(p || alpha p + (1 - alpha) q)
        return _kl(p, _mix(params["alpha"], p, q))
    if name == "skew_reverse_kl":  # DistiLLM: KL(q || alpha q + (1 - alpha) p)
        return _kl(q, _mix(params["alpha"], q, p))
    if name == "tvd":
        return 0.5 * sum(abs(pv - qv) for pv, qv in zip(p, q, strict=True))
    raise AssertionError(name)


def _paper_loss(name: str, params: dict, student, teacher, mask, temperature: float) -> float:
    """Mean over the unmasked tokens of the per-token divergence."""
    values = []
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask is None or mask[b, t]:
                p = _softmax(teacher[b, t].tolist(), temperature)
                q = _softmax(student[b, t].tolist(), temperature)
                values.append(_token_divergence(name, params, p, q))
    return sum(values) / len(values) if values else 0.0


# --- the same formulas as a user would write them in torch (autograd differentiates these) ----------


def _naive(name: str, params: dict, student, teacher, mask, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl":
        per_token = (p * (log_p - log_q)).sum(-1)
    elif name == "reverse_kl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif name == "generalized_jsd":
        beta = params["beta"]
        log_m = torch.log(beta * p + (1 - beta) * q)
        per_token = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    elif name == "skew_forward_kl":
        alpha = params["alpha"]
        per_token = (p * (log_p - torch.log(alpha * p + (1 - alpha) * q))).sum(-1)
    elif name == "skew_reverse_kl":
        alpha = params["alpha"]
        per_token = (q * (log_q - torch.log(alpha * q + (1 - alpha) * p))).sum(-1)
    else:
        per_token = 0.5 * (p - q).abs().sum(-1)
    weights = torch.ones(per_token.shape, dtype=per_token.dtype) if mask is None else mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum()


# --- values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_each_loss_matches_its_paper_formula(name: str, params: dict, temperature: float) -> None:
    student, teacher, mask = _inputs(seed=len(name) + int(10 * temperature))
    value = LM_LOSSES[name](student, teacher, mask, temperature, **params, chunk_size=2)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_paper_loss(name, params, student, teacher, mask, temperature), rel=1e-10)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_no_mask_is_every_token(name: str, params: dict) -> None:
    student, teacher, _ = _inputs(seed=3)
    value = LM_LOSSES[name](student, teacher, None, 1.5, **params)
    assert value.item() == pytest.approx(_paper_loss(name, params, student, teacher, None, 1.5), rel=1e-10)
    ones = torch.ones(B, T, dtype=torch.int64)
    assert torch.equal(LM_LOSSES[name](student, teacher, ones, 1.5, **params), value)


def test_generalized_jsd_follows_trl() -> None:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` builds ``log m`` as logsumexp of ``log q + log(1 - beta)``
    and ``log p + log(beta)`` and returns ``beta KL(p || m) + (1 - beta) KL(q || m)`` (``F.kl_div`` takes
    its arguments in the other order); the mean over unmasked tokens is its ``batchmean`` with labels."""
    student, teacher, mask = _inputs(seed=5)
    beta = torch.tensor(0.3, dtype=torch.float64)
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - beta), log_p + torch.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    jsd = (beta * kl_teacher + (1 - beta) * kl_student)[mask]
    expected = jsd.sum() / mask.sum()
    assert generalized_jsd(student, teacher, mask, beta=0.3).item() == pytest.approx(expected.item(), rel=1e-12)


def test_generalized_jsd_endpoints_are_the_two_kls() -> None:
    student, teacher, mask = _inputs(seed=6)
    assert torch.equal(generalized_jsd(student, teacher, mask, 2.0, beta=0.0), forward_kl(student, teacher, mask, 2.0))
    assert torch.equal(generalized_jsd(student, teacher, mask, 2.0, beta=1.0), reverse_kl(student, teacher, mask, 2.0))
    # The interpolated divergence itself vanishes at the ends (hence the special case).
    assert generalized_jsd(student, teacher, mask, 2.0, beta=1e-9).item() < 1e-6


def test_skew_kls_at_alpha_zero_are_the_plain_kls() -> None:
    student, teacher, mask = _inputs(seed=7)
    assert torch.equal(skew_forward_kl(student, teacher, mask, alpha=0.0), forward_kl(student, teacher, mask))
    assert torch.equal(skew_reverse_kl(student, teacher, mask, alpha=0.0), reverse_kl(student, teacher, mask))
    # ... and close to them for a tiny alpha (the skewed formula is continuous there).
    tiny = skew_forward_kl(student, teacher, mask, alpha=1e-9)
    assert tiny.item() == pytest.approx(forward_kl(student, teacher, mask).item(), rel=1e-6)


def test_identical_distributions_give_zero() -> None:
    student, _, mask = _inputs(seed=8)
    for name, params in CASES:
        assert LM_LOSSES[name](student, student.clone(), mask, **params).item() == pytest.approx(0.0, abs=1e-12)


# --- gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 2.0])
@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_gradient_equals_autograd_of_the_naive_formula(name: str, params: dict, temperature: float) -> None:
    student, teacher, mask = _inputs(seed=11 + len(name))
    chunked = student.clone().requires_grad_()
    LM_LOSSES[name](chunked, teacher, mask, temperature, **params, chunk_size=3).backward()
    naive = student.clone().requires_grad_()
    _naive(name, params, naive, teacher, mask, temperature).backward()
    torch.testing.assert_close(chunked.grad, naive.grad, rtol=1e-9, atol=1e-12)
    assert not chunked.grad[1].any()  # masked tokens get no gradient


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_gradcheck(name: str, params: dict) -> None:
    student, teacher, mask = _inputs(seed=21)
    student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: LM_LOSSES[name](s, teacher, mask, 1.3, **params, chunk_size=4), (student,)
    )


def test_backward_scales_by_the_upstream_gradient_and_survives_a_retained_graph() -> None:
    student, teacher, mask = _inputs(seed=22)
    reference = student.clone().requires_grad_()
    forward_kl(reference, teacher, mask).backward()
    scaled = student.clone().requires_grad_()
    loss = 0.25 * forward_kl(scaled, teacher, mask)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(scaled.grad, 0.25 * reference.grad)
    loss.backward()
    torch.testing.assert_close(scaled.grad, 0.5 * reference.grad)


def test_teacher_gets_no_gradient() -> None:
    student, teacher, mask = _inputs(seed=23)
    student.requires_grad_()
    teacher.requires_grad_()
    reverse_kl(student, teacher, mask).backward()
    assert student.grad is not None
    assert teacher.grad is None


def test_no_grad_and_frozen_student_compute_the_value_only() -> None:
    student, teacher, mask = _inputs(seed=24)
    expected = tvd(student, teacher, mask)
    with torch.no_grad():
        assert torch.equal(tvd(student.requires_grad_(), teacher, mask), expected)
    assert not tvd(student.detach(), teacher, mask).requires_grad


# --- masks, chunks, dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_all_masked_gives_zero_with_a_gradient_path(name: str, params: dict) -> None:
    student, teacher, _ = _inputs(seed=31)
    student.requires_grad_()
    value = LM_LOSSES[name](student, teacher, torch.zeros(B, T, dtype=torch.bool), **params)
    assert value.item() == 0.0
    assert value.requires_grad
    value.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_chunk_sizes_agree(name: str, params: dict) -> None:
    student, teacher, mask = _inputs(seed=32)
    values, grads = [], []
    for chunk_size in (1, 3, 10_000, None):
        leaf = student.clone().requires_grad_()
        value = LM_LOSSES[name](leaf, teacher, mask, 1.7, **params, chunk_size=chunk_size)
        value.backward()
        values.append(value)
        grads.append(leaf.grad)
    for value, grad in zip(values[1:], grads[1:], strict=True):
        torch.testing.assert_close(value, values[0], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad, grads[0], rtol=1e-12, atol=1e-15)


def test_integer_and_float_masks_equal_bool_masks() -> None:
    student, teacher, mask = _inputs(seed=33)
    expected = forward_kl(student, teacher, mask)
    assert torch.equal(forward_kl(student, teacher, mask.long()), expected)
    assert torch.equal(forward_kl(student, teacher, mask.float()), expected)


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_bf16_is_close_to_fp32(name: str, params: dict) -> None:
    student, teacher, mask = _inputs(seed=34)
    full = student.float().requires_grad_()
    expected = LM_LOSSES[name](full, teacher.float(), mask, 2.0, **params)
    expected.backward()
    half = student.bfloat16().requires_grad_()
    value = LM_LOSSES[name](half, teacher.bfloat16(), mask, 2.0, **params)
    value.backward()
    assert value.dtype == torch.float32
    assert half.grad.dtype == torch.bfloat16
    # bf16 keeps 8 bits of the logits: values and gradients agree to a few percent.
    assert value.item() == pytest.approx(expected.item(), rel=5e-2, abs=1e-3)
    torch.testing.assert_close(half.grad.float(), full.grad, rtol=5e-2, atol=2e-3)


def test_negative_infinite_logits_are_zero_probability_not_nan() -> None:
    """A token neither model can emit (-inf in both) adds nothing; one only the teacher rules out is
    finite for every loss but the reverse KL (where it is infinite, as it should be)."""
    student, teacher, mask = _inputs(seed=35)
    student[..., 0] = -math.inf
    teacher[..., 0] = -math.inf
    teacher[..., 1] = -math.inf
    for name, params in CASES:
        if name == "reverse_kl":
            continue
        leaf = student.clone().requires_grad_()
        value = LM_LOSSES[name](leaf, teacher, mask, **params)
        value.backward()
        assert value.item() == pytest.approx(_paper_loss(name, params, student, teacher, mask, 1.0), rel=1e-9), name
        assert torch.isfinite(leaf.grad).all(), name
        assert not leaf.grad[..., 0].any(), name


# --- errors ------------------------------------------------------------------------------------------


def test_vocabulary_mismatch_names_both_shapes() -> None:
    student, _, mask = _inputs()
    with pytest.raises(ValueError, match=r"\(3, 5, 11\).*\(3, 5, 12\)"):
        forward_kl(student, torch.randn(B, T, V + 1, dtype=torch.float64), mask)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, t, m: forward_kl(s, t, m, 0.0), "temperature"),
        (lambda s, t, m: reverse_kl(s, t, m, -1.0), "temperature"),
        (lambda s, t, m: reverse_kl(s, t, m, math.nan), "temperature"),
        (lambda s, t, m: generalized_jsd(s, t, m, beta=1.5), "beta"),
        (lambda s, t, m: generalized_jsd(s, t, m, beta=-0.1), "beta"),
        (lambda s, t, m: skew_forward_kl(s, t, m, alpha=1.0), "alpha"),
        (lambda s, t, m: skew_reverse_kl(s, t, m, alpha=-0.5), "alpha"),
        (lambda s, t, m: tvd(s, t, m[:, :-1]), "mask"),
        (lambda s, t, m: tvd(s, t, m.long() * 2), "0 and 1"),
        (lambda s, t, m: tvd(s[0], t[0]), r"\[batch, tokens, vocab\]"),
        (lambda s, t, m: tvd(s, t, m, chunk_size=0), "chunk_size"),
        (lambda s, t, m: tvd(s.long(), t.long(), m), "floating point"),
    ],
)
def test_bad_arguments_raise(call, message: str) -> None:
    student, teacher, mask = _inputs()
    with pytest.raises(ValueError, match=message):
        call(student, teacher, mask)


def test_lm_loss_dispatches_by_name() -> None:
    student, teacher, mask = _inputs(seed=41)
    for name, params in CASES:
        expected = LM_LOSSES[name](student, teacher, mask, 2.0, **params)
        assert torch.equal(lm_loss(name, student, teacher, mask, 2.0, **params), expected)


def test_lm_loss_unknown_name_suggests_a_close_one() -> None:
    student, teacher, mask = _inputs()
    with pytest.raises(ConfigError, match=r"unknown LM distillation loss 'foward_kl'; did you mean 'forward_kl'"):
        lm_loss("foward_kl", student, teacher, mask)


def test_lm_loss_rejects_parameters_the_loss_does_not_take() -> None:
    student, teacher, mask = _inputs()
    with pytest.raises(ConfigError, match=r"'forward_kl' takes no parameter 'beta' \(valid: chunk_size\)"):
        lm_loss("forward_kl", student, teacher, mask, beta=0.5)
    with pytest.raises(ConfigError, match=r"no parameter 'alpha' \(valid: beta, chunk_size\)"):
        lm_loss("generalized_jsd", student, teacher, mask, alpha=0.5)


# --- memory ------------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import torch.nn.functional as F
    from kdlab.losses.lm import forward_kl

    torch.set_num_threads(1)
    form, batch, tokens, vocab = sys.argv[1], *map(int, sys.argv[2:])
    generator = torch.Generator().manual_seed(0)
    # Drawn in place in bf16: no fp32 temporary raises the peak before the baseline is read.
    student = torch.empty(batch, tokens, vocab, dtype=torch.bfloat16).normal_(0, 3, generator=generator)
    teacher = torch.empty(batch, tokens, vocab, dtype=torch.bfloat16).normal_(0, 3, generator=generator)
    student.requires_grad_()
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, -3:] = False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if form == "naive":
        log_q = F.log_softmax(student.float(), dim=-1)
        log_p = F.log_softmax(teacher.float(), dim=-1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        loss = (per_token * mask).sum() / mask.sum()
    else:
        loss = forward_kl(student, teacher, mask)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"peak_kb": peak, "loss": loss.item()}))
    """
)


def _peak_rss_growth(form: str, batch: int, tokens: int, vocab: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, form, str(batch), str(tokens), str(vocab)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_chunked_peak_memory_is_a_fraction_of_the_naive_form() -> None:
    """N = 1024 tokens x V = 32000 in bf16, forward and backward: the naive fp32 form holds several
    [N, V] fp32 tensors (131 MB each); the chunked one holds the bf16 gradient and chunk temporaries."""
    batch, tokens, vocab = 4, 256, 32_000
    fp32_copy_kb = batch * tokens * vocab * 4 / 1024
    naive = _peak_rss_growth("naive", batch, tokens, vocab)
    chunked = _peak_rss_growth("chunked", batch, tokens, vocab)
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-4)
    assert chunked["peak_kb"] <= 0.5 * naive["peak_kb"], (chunked, naive)
    assert chunked["peak_kb"] < fp32_copy_kb + 32 * 1024, (chunked, fp32_copy_kb)
