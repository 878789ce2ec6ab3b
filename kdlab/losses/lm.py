"""Token-level divergences for language-model distillation, chunked so the vocabulary never costs a full copy.

Every loss takes ``student_logits`` and ``teacher_logits`` of shape ``[B, T, V]`` (any float dtype,
bf16 included) and an optional ``mask`` of shape ``[B, T]`` (bool or 0/1; ``None`` = every token),
and returns the mean over the unmasked tokens of a per-token divergence between the teacher's
``p = softmax(t / tau)`` and the student's ``q = softmax(s / tau)``.

Why chunked: at ``V = 128k`` one fp32 ``[B*T, V]`` tensor is 0.5 GB per thousand tokens, and the
obvious ``log_softmax(s.float()) ...`` form keeps several of them alive for backward. Here the
unmasked rows are processed ``chunk_size`` at a time: each chunk is upcast to fp32 (float64 when
an input is float64), its loss *and* its gradient w.r.t. the student logits are computed
analytically, and the gradient is written into one buffer of the student's dtype; backward only
scales that buffer (the Liger-kernel recipe). Peak extra memory is that buffer plus a few
``chunk_size x V`` fp32 temporaries, and masked tokens cost nothing.

Conventions shared by all losses:

- ``tau`` divides both models' logits, and the result is **not** multiplied by ``tau^2`` (unlike
  :func:`kdlab.losses.response.kd_loss`): weighting, ``tau^2`` included, is the caller's;
- the teacher gets no gradient (it is a frozen model; its logits are treated as constants even
  if they require grad);
- the loss is float32 for half/bf16/float32 inputs and float64 for float64 inputs;
- an all-masked batch gives ``0`` (not NaN), still connected to the student for backward.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from kdlab.errors import ConfigError, unknown

# Elements of one chunk (rows x V): 2**20 fp32 values are 4 MB per temporary.
_CHUNK_ELEMENTS = 2**20


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Forward KL, ``KL(p || q) = sum_v p (log p - log q)``: mass-covering, the classic KD direction."""
    return _lm_divergence("forward_kl", 0.0, student_logits, teacher_logits, mask, temperature, chunk_size)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reverse KL, ``KL(q || p) = sum_v q (log q - log p)``: mode-seeking (MiniLLM, GKD with beta = 1)."""
    return _lm_divergence("reverse_kl", 0.0, student_logits, teacher_logits, mask, temperature, chunk_size)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalised JSD of GKD (Agarwal et al., ICLR 2024, eq. 1), in TRL's ``GKDTrainer`` convention.

    ``m = beta * p + (1 - beta) * q`` and ``JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)``
    (the teacher's ``p`` carries ``beta``, as in TRL's ``generalized_jsd_loss``). The interpolated
    value vanishes at both ends, so, as in TRL, ``beta = 0`` is special-cased to return exactly the
    forward KL ``KL(p || q)`` and ``beta = 1`` exactly the reverse KL ``KL(q || p)``; near the ends
    (e.g. ``beta = 1e-3``) the value is small, not close to a KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "generalized_jsd"
    return _lm_divergence(kind, float(beta), student_logits, teacher_logits, mask, temperature, chunk_size)


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024): ``KL(p || alpha * p + (1 - alpha) * q)``.

    Mixing some of the teacher into the student's side bounds the log-ratio (it is at most
    ``-log alpha``), which keeps the gradient finite where the student puts almost no mass.
    ``alpha = 0`` is the forward KL.
    """
    _check_alpha(alpha)
    kind = "forward_kl" if alpha == 0 else "skew_forward_kl"
    return _lm_divergence(kind, float(alpha), student_logits, teacher_logits, mask, temperature, chunk_size)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    alpha: float = 0.1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., ICML 2024): ``KL(q || alpha * q + (1 - alpha) * p)``.

    ``alpha = 0`` is the reverse KL.
    """
    _check_alpha(alpha)
    kind = "reverse_kl" if alpha == 0 else "skew_reverse_kl"
    return _lm_divergence(kind, float(alpha), student_logits, teacher_logits, mask, temperature, chunk_size)


def tvd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_v |p - q|`` (bounded in [0, 1], symmetric).

    Not differentiable where ``p_v = q_v``; the gradient there uses ``sign(0) = 0``.
    """
    return _lm_divergence("tvd", 0.0, student_logits, teacher_logits, mask, temperature, chunk_size)


LM_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def lm_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    **params: object,
) -> torch.Tensor:
    """The loss of :data:`LM_LOSSES` called ``name``, for configs: unknown names and parameters are
    :class:`~kdlab.errors.ConfigError` (a typo'd ``beta`` must not silently fall back to the default)."""
    if name not in LM_LOSSES:
        raise ConfigError(str(unknown("LM distillation loss", name, LM_LOSSES)))
    loss = LM_LOSSES[name]
    valid = lm_loss_params(name)
    extra = sorted(set(params) - set(valid))
    if extra:
        raise ConfigError(
            f"LM distillation loss '{name}' takes no parameter {', '.join(repr(e) for e in extra)} "
            f"(valid: {', '.join(valid)})"
        )
    return loss(student_logits, teacher_logits, mask, temperature, **params)


def lm_loss_params(name: str) -> list[str]:
    """The keyword-only parameters (``beta``, ``alpha``, ``chunk_size``) of the loss ``name``."""
    parameters = inspect.signature(LM_LOSSES[name]).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


def _lm_divergence(
    kind: str,
    param: float,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    chunk_size: int | None,
) -> torch.Tensor:
    """Validate, select the unmasked rows and run the chunked autograd function."""
    if not temperature > 0:  # NaN too
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; both must be [batch, tokens, vocab] over the same vocabulary"
        )
    if student_logits.dim() != 3:
        raise ValueError(f"logits must be [batch, tokens, vocab], got shape {tuple(student_logits.shape)}")
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise ValueError(f"logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    batch, tokens, vocab = student_logits.shape
    rows = None
    if mask is not None:
        if tuple(mask.shape) != (batch, tokens):
            raise ValueError(f"mask must be [batch, tokens] = {(batch, tokens)}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("a non-bool mask must hold only 0 and 1")
            mask = mask != 0
        flat_mask = mask.reshape(-1).to(student_logits.device)
        if not bool(flat_mask.all()):
            rows = flat_mask.nonzero().squeeze(1)
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedDivergence.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        rows,
        kind,
        param,
        float(temperature),
        chunk_size,
        needs_grad,
    )


class _ChunkedDivergence(torch.autograd.Function):
    """Mean per-row divergence of ``[R, V]`` logits over ``rows`` (all when None), gradient computed in forward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        rows: torch.Tensor | None,
        kind: str,
        param: float,
        temperature: float,
        chunk_size: int,
        needs_grad: bool,
    ) -> torch.Tensor:
        compute_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        count = student.shape[0] if rows is None else rows.numel()
        grad = None
        if needs_grad:
            grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        total = torch.zeros((), dtype=compute_dtype, device=student.device)
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            if rows is None:
                index = None
                s, t = student[start:stop], teacher[start:stop]
            else:
                index = rows[start:stop]
                s, t = student.index_select(0, index), teacher.index_select(0, index)
            loss, chunk_grad = _divergence(kind, param, s, t, temperature, compute_dtype, needs_grad)
            del s, t
            total += loss.sum()
            if grad is not None and chunk_grad is not None:
                # d(mean)/d(raw logits): 1/count for the mean, 1/tau for s = raw / tau.
                chunk_grad = chunk_grad.mul_(1.0 / (count * temperature)).to(grad.dtype)
                if index is None:
                    grad[start:stop] = chunk_grad
                else:
                    grad.index_copy_(0, index, chunk_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total / max(count, 1)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # Not in place: a retained graph may run backward again on the same buffer.
        if bool(grad_output != 1):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None, None, None


def _divergence(
    kind: str,
    param: float,
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    dtype: torch.dtype,
    needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row divergence of a ``[c, V]`` chunk of raw logits and its gradient w.r.t. ``s = student / tau``.

    With ``q = softmax(s)`` and ``g = dL/dq``, ``dL/ds = q * (g - <q, g>)``; terms of ``g`` that are
    constant over the vocabulary cancel and are left out. Log-probabilities are clamped to the
    dtype's lowest finite value, so ``-inf`` logits (zero probability) give ``0 log 0 = 0``, not NaN.
    Temporaries are freed or reused in place: a chunk costs a handful of ``[c, V]`` buffers.
    """
    log_q = _log_softmax(student, temperature, dtype)
    log_p = _log_softmax(teacher, temperature, dtype)
    p = log_p.exp()
    grad = None
    if kind == "forward_kl":
        loss = (log_p - log_q).mul_(p).sum(-1)
        if needs_grad:
            grad = log_q.exp_().sub_(p)
    elif kind == "reverse_kl":
        del p
        q = log_q.exp()
        r = log_q.sub_(log_p)
        loss = (q * r).sum(-1)
        if needs_grad:
            grad = r.sub_(loss.unsqueeze(-1)).mul_(q)
    elif kind == "generalized_jsd":
        beta = param
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = (log_p - log_m).mul_(p).sum(-1)
        del p, log_p
        q = log_q.exp()
        r = log_q.sub_(log_m)
        kl_qm = (q * r).sum(-1)
        loss = beta * kl_pm + (1 - beta) * kl_qm
        if needs_grad:
            # g = (1 - beta) (log q - log m) + const: the beta * KL(p || m) term and the q-derivative
            # of log m inside KL(q || m) add up to -(1 - beta) (beta p + (1 - beta) q) / m = -(1 - beta).
            grad = r.sub_(kl_qm.unsqueeze(-1)).mul_(q).mul_(1 - beta)
    elif kind == "skew_forward_kl":
        alpha = param
        log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
        loss = (log_p - log_m).mul_(p).sum(-1)
        if needs_grad:
            # g = -(1 - alpha) p / m, so dL/ds = (1 - alpha) (q <q, p/m> - q p / m).
            q = log_q.exp_()
            w = log_p.sub_(log_m).exp_().mul_(q)
            grad = q.mul_(w.sum(-1, keepdim=True)).sub_(w).mul_(1 - alpha)
    elif kind == "skew_reverse_kl":
        alpha = param
        del p
        log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha))
        del log_p
        q = log_q.exp()
        r = log_q.sub_(log_m)
        loss = (q * r).sum(-1)
        if needs_grad:
            # g = log q - log m - alpha q / m (+ 1).
            g = r.sub_(log_m.copy_(r).exp_().mul_(alpha))
            grad = g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)
    elif kind == "tvd":
        diff = log_q.exp_().sub_(p)
        loss = 0.5 * diff.abs().sum(-1)
        if needs_grad:
            q = diff.add(p)
            g = diff.sign_().mul_(0.5)
            grad = g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)
    else:  # pragma: no cover - the public functions only pass the kinds above
        raise AssertionError(kind)
    return loss, grad


def _log_softmax(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``log_softmax(logits / tau)`` in ``dtype``, ``-inf`` clamped to the lowest finite value."""
    scaled = logits.to(dtype)
    scaled = scaled / temperature if temperature != 1 else scaled
    return torch.log_softmax(scaled, dim=-1).clamp_min_(torch.finfo(dtype).min)
