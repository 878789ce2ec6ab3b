"""Feature-based losses: the student matches (a transform of) the teacher's intermediate feature maps.

Feature maps are ``[B, C, *spatial]`` with one spatial dimension (MNIST-1D signals, ``[B, C, L]``)
or two (images, ``[B, C, H, W]``). Where the two models' maps differ in spatial size, the larger
one is average-pooled to the smaller (:func:`pool_to_match`), as RepDistiller does for AT, NST, FT
and VID.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_ADAPTIVE_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pool_to_match(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool both maps to their common (per-dimension smallest) spatial size.

    RepDistiller pools the map with the larger height to ``(h, h)`` of the smaller one; for the
    square maps it meets this is the same, and per-dimension minima also serve non-square maps.
    """
    if student_feature.dim() != teacher_feature.dim() or student_feature.dim() < 3:
        raise ValueError(
            "feature maps must both be [B, C, *spatial] with the same number of spatial dimensions,"
            f" got {list(student_feature.shape)} and {list(teacher_feature.shape)}"
        )
    size = tuple(min(s, t) for s, t in zip(student_feature.shape[2:], teacher_feature.shape[2:], strict=True))
    pool = _ADAPTIVE_POOLS[len(size)]
    if student_feature.shape[2:] != size:
        student_feature = pool(student_feature, size)
    if teacher_feature.shape[2:] != size:
        teacher_feature = pool(teacher_feature, size)
    return student_feature, teacher_feature


def hint_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al., ICLR 2015): ``1/2 ||u_h - r(v_g)||^2`` between the teacher's hint and
    the regressed student guided layer.

    As in RepDistiller's ``HintLoss`` (``nn.MSELoss``): the squared error is averaged over every
    element (batch, channels, positions) without the paper's 1/2; ``student_hint`` is the regressor's
    output, of the teacher hint's shape.
    """
    if student_hint.shape != teacher_hint.shape:
        raise ValueError(f"hint shapes differ: student {list(student_hint.shape)}, teacher {list(teacher_hint.shape)}")
    return F.mse_loss(student_hint, teacher_hint)


def attention_map(feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Spatial attention ``Q = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2`` of a ``[B, C, *spatial]`` map,
    flattened to ``[B, positions]``.

    Like the authors' code, it raises ``A`` to ``p`` without the absolute value (the same for even
    ``p`` and for the non-negative post-ReLU maps AT is applied to) and takes the channel mean
    rather than the paper's sum (the normalisation removes the difference).
    """
    return F.normalize(feature.pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) for one pair of feature maps.

    ``mean_{b, j} (Q_S[b, j] - Q_T[b, j])^2`` with ``Q`` the normalised attention maps
    (:func:`attention_map`): the authors' ``at_loss`` and RepDistiller's ``Attention``, i.e. the
    paper's ``||Q_S - Q_T||_2`` squared and averaged over batch and positions rather than summed. The
    channel counts may differ; different spatial sizes are pooled to the smaller one first.
    """
    student_feature, teacher_feature = pool_to_match(student_feature, teacher_feature)
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``k(x_i, y_j) = (x_i . y_j)^2`` for all pairs of rows: ``[B, N, D], [B, M, D] -> [B, N, M]``."""
    return torch.bmm(x, y.transpose(1, 2)).pow(2)


def nst_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer (Huang & Wang, 2017): squared MMD between the sets of channel
    activation patterns, with the polynomial kernel ``k(x, y) = (x^T y)^2`` (degree 2, ``c = 0``).

    Each channel's map is flattened and L2-normalised over its positions, ``f_i`` for the student's
    ``C_S`` channels and ``g_j`` for the teacher's ``C_T``; then, per sample,

        MMD^2 = 1/C_T^2 sum_{j,j'} k(g_j, g_j') + 1/C_S^2 sum_{i,i'} k(f_i, f_i') - 2/(C_S C_T) sum_{i,j} k(f_i, g_j),

    averaged over the batch. RepDistiller's ``NSTLoss`` keeps all three terms (``full_loss=True``);
    the teacher-only term carries no gradient (it is detached there, and here). Different spatial
    sizes are pooled to the smaller one first.
    """
    student_feature, teacher_feature = pool_to_match(student_feature, teacher_feature)
    f_s = F.normalize(student_feature.flatten(2), dim=2)
    f_t = F.normalize(teacher_feature.flatten(2), dim=2)
    teacher_term = _polynomial_kernel(f_t, f_t).mean().detach()
    return teacher_term + _polynomial_kernel(f_s, f_s).mean() - 2 * _polynomial_kernel(f_s, f_t).mean()


def ab_loss(
    student_preacts: Sequence[torch.Tensor], teacher_preacts: Sequence[torch.Tensor], margin: float = 1.0
) -> torch.Tensor:
    """Activation-boundary transfer (Heo et al., AAAI 2019), the paper's alternative (hinge) L2 loss.

    For each layer ``l`` (shallow to deep, ``n`` layers), with ``S`` the connector's output of the
    student pre-activation and ``T`` the teacher pre-activation (same shape),

        L_l = sum_{b, c, positions} [T > 0] relu(m - S)^2 + [T <= 0] relu(m + S)^2,

    and, as in RepDistiller's ``ABLoss``, the layers are weighted ``2^(l - n + 1)`` (the deepest 1,
    each shallower one half the next), each sum is divided by the batch size and scaled by
    ``3 / 1000``: ``sum_l 2^(l - n + 1) * L_l / B * 3 / 1000``.
    """
    if len(student_preacts) != len(teacher_preacts) or not student_preacts:
        raise ValueError(
            f"need as many student as teacher layers (>0), got {len(student_preacts)} and {len(teacher_preacts)}"
        )
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    layers = len(student_preacts)
    batch = student_preacts[0].shape[0]
    total = student_preacts[0].new_zeros(())
    for index, (source, target) in enumerate(zip(student_preacts, teacher_preacts, strict=True)):
        if source.shape != target.shape:
            raise ValueError(f"layer {index}: student {list(source.shape)} vs teacher {list(target.shape)}")
        active = target > 0
        # Only a student response on the wrong side of its margin costs anything.
        below = ((source + margin) ** 2) * ((source > -margin) & ~active)
        above = ((source - margin) ** 2) * ((source <= margin) & active)
        total = total + 2.0 ** (index - layers + 1) * (below + above).sum()
    return total / batch * 3 / 1000


def factor_transfer_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 1) -> torch.Tensor:
    """Factor transfer (Kim et al., NeurIPS 2018): ``|| F_T/||F_T||_2 - F_S/||F_S||_2 ||_p`` between the
    translator's (student) and the paraphraser's (teacher) factors, ``p = 1`` in the paper.

    RepDistiller's ``FactorTransfer``, which produced the CRD table, first reduces each factor to
    ``mean_c F_c^2`` (an attention map, as in AT) and L2-normalises that per sample; the loss is the
    mean over batch and positions of ``|difference|^p`` (``.abs().mean()`` for ``p = 1``). Different
    spatial sizes are pooled to the smaller one first.
    """
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    student_factor, teacher_factor = pool_to_match(student_factor, teacher_factor)
    difference = attention_map(student_factor, 2) - attention_map(teacher_factor, 2)
    return difference.abs().pow(p).mean()


def vid_loss(predicted_mean: torch.Tensor, teacher_feature: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Variational information distillation (Ahn et al., CVPR 2019): the negative log-likelihood of
    the teacher's feature under a Gaussian ``N(mu(s), sigma_c^2)`` predicted from the student.

        -log q(t | s) = 1/2 [ (t - mu)^2 / sigma_c^2 + log sigma_c^2 ] (+ log(2 pi) / 2, dropped),

    averaged over batch, channels and positions, as in the authors' code and RepDistiller's
    ``VIDLoss``. ``predicted_mean`` has the teacher feature's shape; ``variance`` holds one positive
    value per channel (``[C]``), shared by every position.
    """
    if predicted_mean.shape != teacher_feature.shape:
        raise ValueError(f"prediction {list(predicted_mean.shape)} vs teacher {list(teacher_feature.shape)}")
    if variance.shape != (teacher_feature.shape[1],):
        raise ValueError(f"variance must be [C={teacher_feature.shape[1]}], got {list(variance.shape)}")
    variance = variance.view(1, -1, *([1] * (teacher_feature.dim() - 2)))
    return 0.5 * ((predicted_mean - teacher_feature).pow(2) / variance + variance.log()).mean()
