"""Relation-based losses: the student matches relations (between layers, or between samples).

FSP relates two layers of one network; RKD, SP, PKT and CC relate the samples of a batch. Each
function follows RepDistiller's implementation (the CRD benchmark's code) in its constants and
reductions; where that differs from the paper the docstring says so. Features may be vectors
``[B, D]``, 1-D maps ``[B, C, L]`` (MNIST-1D) or 2-D maps ``[B, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FeaturePair = tuple[torch.Tensor, torch.Tensor]

_ADAPTIVE_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d}


def _pool_to(feature: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Average-pool the spatial dims of ``feature`` down to ``size`` (no-op when already there)."""
    if tuple(feature.shape[2:]) == size:
        return feature
    pool = _ADAPTIVE_POOLS.get(len(size))
    if pool is None:
        raise ValueError(f"cannot pool {len(size)}-D feature maps (1-D and 2-D are supported)")
    return pool(feature, size)


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Yim et al. eq. 1, the "flow of solution procedure" between two layers: ``[B, C1, C2]`` with
    ``G_ij = (1/N) sum_n first_i(n) second_j(n)`` over the N spatial positions.

    The layers must have the same batch size and spatial rank; when their spatial sizes differ, the
    larger map is average-pooled to the smaller one first (RepDistiller's ``FSP.compute_fsp``,
    adaptive pooling in the features' own dimensionality). ``[B, C]`` vectors count as one position.
    """
    if first.dim() != second.dim() or first.shape[0] != second.shape[0]:
        raise ValueError(
            f"FSP needs layers of equal batch size and rank, got {list(first.shape)} and {list(second.shape)}"
        )
    if first.dim() == 2:
        first, second = first.unsqueeze(-1), second.unsqueeze(-1)
    size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:], strict=True))
    first = _pool_to(first, size).flatten(2)
    second = _pool_to(second, size).flatten(2)
    return first @ second.transpose(1, 2) / first.shape[-1]


def fsp_loss(student_pairs: Sequence[FeaturePair], teacher_pairs: Sequence[FeaturePair]) -> torch.Tensor:
    """Yim et al. 2017, eq. 2: ``sum_pairs mean_(b,i,j) (G_s - G_t)^2`` over the FSP matrices of
    the given (first layer, second layer) pairs.

    The paper weighs each pair's squared L2 distance by ``lambda_i`` and averages over samples;
    RepDistiller (followed here) takes the mean over batch and both channel axes per pair, then
    sums the pairs. The student's and teacher's pairs must give FSP matrices of equal shape, i.e.
    equal channel counts layer by layer.
    """
    if len(student_pairs) != len(teacher_pairs):
        raise ValueError(
            f"FSP needs as many student pairs as teacher pairs, got {len(student_pairs)} and {len(teacher_pairs)}"
        )
    if not student_pairs:
        raise ValueError("FSP needs at least one pair of layers")
    terms = []
    for k, (student_pair, teacher_pair) in enumerate(zip(student_pairs, teacher_pairs, strict=True)):
        student_fsp, teacher_fsp = fsp_matrix(*student_pair), fsp_matrix(*teacher_pair)
        if student_fsp.shape != teacher_fsp.shape:
            raise ValueError(
                f"FSP pair {k}: student matrix {list(student_fsp.shape)} vs teacher {list(teacher_fsp.shape)};"
                " the layers need equal batch sizes and channel counts"
            )
        terms.append((student_fsp - teacher_fsp).pow(2).mean())
    return torch.stack(terms).sum()


def _pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix, squared distances clamped at ``eps`` before the root (a finite
    gradient for coincident points) and an exact zero diagonal (RepDistiller's ``pdist``)."""
    squared_norms = embedding.pow(2).sum(dim=1)
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * embedding @ embedding.t()).clamp(min=eps)
    off_diagonal = ~torch.eye(len(embedding), dtype=torch.bool, device=embedding.device)
    return squared.sqrt() * off_diagonal


def _mean_normalised_distances(embedding: torch.Tensor) -> torch.Tensor:
    """RKD's distance potential: pairwise distances over their mean on distinct pairs."""
    distances = _pairwise_distances(embedding)
    return distances / distances[distances > 0].mean()


def _angles(embedding: torch.Tensor) -> torch.Tensor:
    """``[B, B, B]`` cosines ``<e(x_j - x_i), e(x_k - x_i)>`` with ``e`` the unit direction (zero for
    a zero vector, via ``F.normalize``'s eps): the angle at vertex ``i`` (RKD's angle potential)."""
    differences = embedding[None, :, :] - embedding[:, None, :]
    directions = F.normalize(differences, p=2, dim=2)
    return directions @ directions.transpose(1, 2)


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Park et al. 2019: ``distance_weight * L_D + angle_weight * L_A`` (RKD-DA).

    ``L_D``: Huber (smooth L1, delta 1) between the pairwise distances of each model's samples,
    each divided by its mean over distinct pairs; ``L_A``: Huber between the cosines of the angles
    of every triplet. As in RepDistiller, both are means over all ``B^2`` / ``B^3`` entries
    (the zero diagonal and degenerate triplets included), inputs are flattened per sample, and
    no gradient flows into the teacher. A batch of one sample has no relations: the loss is 0.
    """
    student = student_embedding.flatten(1)
    teacher = teacher_embedding.flatten(1).detach()
    if len(student) < 2:
        return (student * 0.0).sum()
    loss_distance = F.smooth_l1_loss(_mean_normalised_distances(student), _mean_normalised_distances(teacher))
    loss_angle = F.smooth_l1_loss(_angles(student), _angles(teacher))
    return distance_weight * loss_distance + angle_weight * loss_angle


def _similarity(feature: torch.Tensor) -> torch.Tensor:
    """SP's batch similarity: ``f f^T`` of the flattened features, each row scaled to unit L2 norm."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), p=2, dim=1)


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Tung & Mori 2019, eq. 4: ``(1/B^2) ||G_t - G_s||_F^2`` with ``G`` the row-normalised
    ``B x B`` similarity of the flattened activations (RepDistiller's ``Similarity``). The two
    models' feature sizes may differ; only the batch sizes must agree."""
    batch = student_feature.shape[0]
    if teacher_feature.shape[0] != batch:
        raise ValueError(f"SP needs equal batch sizes, got {batch} and {teacher_feature.shape[0]}")
    difference = _similarity(teacher_feature) - _similarity(student_feature)
    return difference.pow(2).sum() / batch**2


def _cosine_probabilities(embedding: torch.Tensor, eps: float) -> torch.Tensor:
    """PKT's conditional probabilities ``p(j|i)``: cosine similarities mapped to [0, 1], rows summing to 1."""
    unit = embedding / (embedding.norm(p=2, dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    kernel = (unit @ unit.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Passalis & Tefas 2018, eq. 10: ``KL(P_t || P_s)`` between the models' conditional
    probabilities ``p(j|i) = K(x_i, x_j) / sum_k K(x_i, x_k)``, cosine kernel ``K = (cos + 1) / 2``.

    The author's code (used by RepDistiller, followed here) keeps ``j = i`` in the sums (the paper
    excludes it), adds ``eps = 1e-7`` to the norms and inside the log ratio, and takes the mean,
    not the sum, over the ``B x B`` entries. Inputs are flattened per sample.
    """
    eps = 1e-7
    student = _cosine_probabilities(student_embedding.flatten(1), eps)
    teacher = _cosine_probabilities(teacher_embedding.flatten(1), eps)
    return (teacher * torch.log((teacher + eps) / (student + eps))).mean()


def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """Correlation congruence as in RepDistiller's ``Correlation`` (code the CC authors shared):
    ``mean_i sum_d |s_i - t_i|_d |s_(i+1) - t_(i+1)|_d`` over consecutive samples of the batch.

    This is not the paper's kernel correlation matrix (Peng et al. 2019, eq. 7); it is the
    implementation behind the CRD benchmark's CC numbers. Both inputs are the (embedded) vectors
    of equal shape; a batch of one sample has no consecutive pair: the loss is 0.
    """
    if student_embedding.shape != teacher_embedding.shape:
        shapes = f"{list(student_embedding.shape)} and {list(teacher_embedding.shape)}"
        raise ValueError(f"CC needs embeddings of equal shape, got {shapes}")
    delta = (student_embedding - teacher_embedding).abs().flatten(1)
    if len(delta) < 2:
        return (delta * 0.0).sum()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()
