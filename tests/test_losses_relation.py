"""Relation-based losses (FSP, RKD, SP, PKT, CC) against their formulas written out with loops in
float64, and the method objects built on them (setup from feature shapes, initialisation stage,
returned terms)."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import pytest
import torch

from kdlab.data.base import Batch, DataInfo
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.losses.relation import cc_loss, fsp_loss, fsp_matrix, pkt_loss, rkd_loss, sp_loss
from kdlab.methods import METHODS
from kdlab.methods.cc import CorrelationCongruence
from kdlab.methods.fsp import FSP
from kdlab.models import create_model

RELATION_METHODS = ("fsp", "rkd", "sp", "pkt", "cc")


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(x.shape[0], -1).tolist()


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


# ---------------------------------------------------------------- FSP


def _block_average(feature: torch.Tensor, size: tuple[int, ...]) -> list[list[list[float]]]:
    """[B][C][positions] after averaging non-overlapping blocks down to ``size`` (integral ratios)."""
    out = []
    for sample in feature.tolist():
        channels = []
        for channel in sample:
            if len(size) == 1:
                k = len(channel) // size[0]
                channels.append([sum(channel[p * k : (p + 1) * k]) / k for p in range(size[0])])
            else:
                kh, kw = len(channel) // size[0], len(channel[0]) // size[1]
                channels.append(
                    [
                        sum(channel[y * kh + a][x * kw + b] for a in range(kh) for b in range(kw)) / (kh * kw)
                        for y in range(size[0])
                        for x in range(size[1])
                    ]
                )
        out.append(channels)
    return out


def _paper_fsp(first: torch.Tensor, second: torch.Tensor) -> list[list[list[float]]]:
    """G[b][i][j] = (1/N) sum_n F1_i(n) F2_j(n), the larger map block-averaged to the smaller one."""
    size = tuple(min(a, b) for a, b in zip(first.shape[2:], second.shape[2:], strict=True))
    f1, f2 = _block_average(first, size), _block_average(second, size)
    return [[[_dot(a, b) / len(a) for b in s2] for a in s1] for s1, s2 in zip(f1, f2, strict=True)]


def _paper_fsp_loss(student_pairs: list, teacher_pairs: list) -> float:
    """sum over pairs of mean over (b, i, j) of (G_s - G_t)^2."""
    total = 0.0
    for s_pair, t_pair in zip(student_pairs, teacher_pairs, strict=True):
        gs, gt = _paper_fsp(*s_pair), _paper_fsp(*t_pair)
        values = [
            (gs[b][i][j] - gt[b][i][j]) ** 2
            for b in range(len(gs))
            for i in range(len(gs[0]))
            for j in range(len(gs[0][0]))
        ]
        total += sum(values) / len(values)
    return total


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    ("student_sizes", "teacher_sizes"),
    [
        pytest.param([(8,), (4,), (4,)], [(16,), (8,), (4,)], id="1d"),
        pytest.param([(4, 4), (2, 2), (2, 2)], [(8, 8), (4, 4), (4, 4)], id="2d"),
    ],
)
def test_fsp_loss_matches_the_paper_formula(batch: int, student_sizes: list, teacher_sizes: list) -> None:
    channels = (2, 3, 4)
    student = [_randn(batch, c, *size, seed=k) for k, (c, size) in enumerate(zip(channels, student_sizes, strict=True))]
    teacher = [
        _randn(batch, c, *size, seed=10 + k) for k, (c, size) in enumerate(zip(channels, teacher_sizes, strict=True))
    ]
    student_pairs = list(pairwise(student))
    teacher_pairs = list(pairwise(teacher))
    value = fsp_loss(student_pairs, teacher_pairs)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(_paper_fsp_loss(student_pairs, teacher_pairs), rel=1e-12)
    assert fsp_loss(student_pairs, [(a.clone(), b.clone()) for a, b in student_pairs]).item() == 0.0


def test_fsp_matrix_of_vectors_is_the_outer_product() -> None:
    a, b = _randn(2, 3), _randn(2, 4, seed=1)
    torch.testing.assert_close(fsp_matrix(a, b), a[:, :, None] * b[:, None, :])


def test_fsp_loss_rejects_unequal_channels_and_pair_counts() -> None:
    pair = (_randn(2, 3, 4), _randn(2, 5, 4))
    with pytest.raises(ValueError, match="channel"):
        fsp_loss([pair], [(_randn(2, 3, 4), _randn(2, 6, 4))])
    with pytest.raises(ValueError, match="pairs"):
        fsp_loss([pair, pair], [pair])


# ---------------------------------------------------------------- RKD


def _paper_rkd(student: torch.Tensor, teacher: torch.Tensor, w_d: float, w_a: float) -> float:
    """Park et al.: Huber on mean-normalised distances (all B^2 entries, zero diagonal) and on the
    cosines of every angle x_j - x_i, x_k - x_i (all B^3 triplets, 0 for a degenerate side)."""
    s, t = _rows(student), _rows(teacher)
    n = len(s)

    def distances(x: list[list[float]]) -> list[list[float]]:
        d = [[math.dist(x[i], x[j]) for j in range(n)] for i in range(n)]
        mu = sum(d[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return [[v / mu for v in row] for row in d]

    def cosine(x: list[list[float]], i: int, j: int, k: int) -> float:
        u = [a - b for a, b in zip(x[j], x[i], strict=True)]
        v = [a - b for a, b in zip(x[k], x[i], strict=True)]
        nu, nv = math.sqrt(_dot(u, u)), math.sqrt(_dot(v, v))
        return 0.0 if nu == 0 or nv == 0 else _dot(u, v) / (nu * nv)

    ds, dt = distances(s), distances(t)
    loss_d = sum(_huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2
    triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    loss_a = sum(_huber(cosine(s, *ijk) - cosine(t, *ijk)) for ijk in triplets) / n**3
    return w_d * loss_d + w_a * loss_a


@pytest.mark.parametrize(("w_d", "w_a"), [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_loss_matches_the_paper_formula(w_d: float, w_a: float) -> None:
    student, teacher = _randn(5, 3) * 2, _randn(5, 7, seed=1)
    value = rkd_loss(student, teacher, w_d, w_a)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_paper_rkd(student, teacher, w_d, w_a), rel=1e-9)


def test_rkd_loss_is_scale_invariant_zero_on_identity_and_flattens_maps() -> None:
    student, teacher = _randn(4, 2, 3, 3), _randn(4, 5, 2, 2, seed=1)
    value = rkd_loss(student, teacher)
    assert value.item() == pytest.approx(_paper_rkd(student, teacher, 25.0, 50.0), rel=1e-9)
    assert rkd_loss(student * 7.0, teacher).item() == pytest.approx(value.item(), rel=1e-9)
    assert rkd_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # two samples: one distance, normalised to 1 on both sides
    assert rkd_loss(_randn(2, 3), _randn(2, 3, seed=1), angle_weight=0.0).item() == 0.0


def test_rkd_loss_trains_the_student_only_and_is_zero_for_one_sample() -> None:
    student = _randn(4, 3).requires_grad_(True)
    teacher = _randn(4, 3, seed=1).requires_grad_(True)
    rkd_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    single = _randn(1, 3).requires_grad_(True)
    value = rkd_loss(single, _randn(1, 3, seed=1))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(single.grad, torch.zeros_like(single))


# ---------------------------------------------------------------- SP


def _paper_sp(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """(1/B^2) ||G_t - G_s||_F^2, G = Q Q^T with every row divided by its L2 norm."""

    def similarity(x: list[list[float]]) -> list[list[float]]:
        g = [[_dot(a, b) for b in x] for a in x]
        return [[v / math.sqrt(_dot(row, row)) for v in row] for row in g]

    gs, gt = similarity(_rows(student)), similarity(_rows(teacher))
    n = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((6, 4, 8), (6, 5, 4)), ((6, 2, 3, 3), (6, 4, 2, 2)), ((6, 10), (6, 3))],
    ids=["1d", "2d", "vectors"],
)
def test_sp_loss_matches_the_paper_formula(student_shape: tuple, teacher_shape: tuple) -> None:
    student, teacher = _randn(*student_shape), _randn(*teacher_shape, seed=1)
    value = sp_loss(student, teacher)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(_paper_sp(student, teacher), rel=1e-12)
    assert sp_loss(student * 3.0, teacher).item() == pytest.approx(value.item(), rel=1e-12)
    assert sp_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-15)


def test_sp_loss_one_sample_and_unequal_batches() -> None:
    assert sp_loss(_randn(1, 3, 4), _randn(1, 2, 2, seed=1)).item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="batch"):
        sp_loss(_randn(2, 3), _randn(3, 3))


# ---------------------------------------------------------------- PKT


def _paper_pkt(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-7) -> float:
    """mean_(i,j) p_t(j|i) log((p_t + eps) / (p_s + eps)), p(j|i) = K_ij / sum_k K_ik,
    K = (cos + 1)/2 with cos from vectors divided by (norm + eps), j = i included (author's code)."""

    def probabilities(x: list[list[float]]) -> list[list[float]]:
        unit = [[v / (math.sqrt(_dot(r, r)) + eps) for v in r] for r in x]
        k = [[(_dot(a, b) + 1) / 2 for b in unit] for a in unit]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probabilities(_rows(student)), probabilities(_rows(teacher))
    n = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(n) for j in range(n)) / n**2


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize(("student_dim", "teacher_dim"), [((6,), (9,)), ((2, 3, 3), (4, 2))], ids=["vectors", "maps"])
def test_pkt_loss_matches_the_paper_formula(batch: int, student_dim: tuple, teacher_dim: tuple) -> None:
    student, teacher = _randn(batch, *student_dim), _randn(batch, *teacher_dim, seed=1)
    value = pkt_loss(student, teacher)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(_paper_pkt(student, teacher), rel=1e-9, abs=1e-15)
    assert pkt_loss(student, student.clone()).item() == pytest.approx(0.0, abs=1e-15)
    if batch > 1:
        assert value.item() > 0


def test_pkt_loss_of_a_zero_vector_stays_finite() -> None:
    student = _randn(3, 4)
    student[1] = 0.0
    assert torch.isfinite(pkt_loss(student, _randn(3, 4, seed=1)))


# ---------------------------------------------------------------- CC


def _reference_cc(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """(1/(B-1)) sum_i sum_d |s_i - t_i|_d |s_(i+1) - t_(i+1)|_d (RepDistiller's Correlation)."""
    s, t = _rows(student), _rows(teacher)
    delta = [[abs(a - b) for a, b in zip(rs, rt, strict=True)] for rs, rt in zip(s, t, strict=True)]
    return sum(_dot(delta[i], delta[i + 1]) for i in range(len(delta) - 1)) / (len(delta) - 1)


def test_cc_loss_matches_the_reference_formula() -> None:
    student, teacher = _randn(5, 8), _randn(5, 8, seed=1)
    value = cc_loss(student, teacher)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(_reference_cc(student, teacher), rel=1e-12)
    assert cc_loss(student, student.clone()).item() == 0.0


def test_cc_loss_one_sample_and_shape_mismatch() -> None:
    single = _randn(1, 4).requires_grad_(True)
    value = cc_loss(single, _randn(1, 4, seed=1))
    assert value.item() == 0.0
    value.backward()
    with pytest.raises(ValueError, match="equal shape"):
        cc_loss(_randn(2, 4), _randn(2, 5))


# ---------------------------------------------------------------- methods


def _output(widths: tuple[int, ...], spatial: tuple[int, ...], batch: int = 4, seed: int = 0) -> ModelOutput:
    """Fake features for every tap the relation methods use: stages halve the spatial size."""
    stages = []
    for k, width in enumerate(widths):
        size = tuple(max(1, s // 2**k) for s in spatial)
        stages.append(torch.randn(batch, width, *size, generator=torch.Generator().manual_seed(seed + k)))
    embedding = stages[-1].flatten(2).mean(-1)
    features = {"stem+stages": stages, "stage:-1": stages[-1], "embedding": embedding}
    return ModelOutput(torch.randn(batch, 10), features)


def _data() -> DataInfo:
    return DataInfo(num_samples=8, num_classes=10, targets=torch.zeros(8, dtype=torch.long))


def _batch(size: int = 4) -> Batch:
    return {"input": torch.zeros(size, 40), "target": torch.zeros(size, dtype=torch.long), "index": torch.arange(size)}


@pytest.mark.parametrize("spatial", [(16,), (8, 8)], ids=["1d", "2d"])
@pytest.mark.parametrize("name", RELATION_METHODS)
def test_relation_methods_return_their_weighted_terms(name: str, spatial: tuple[int, ...]) -> None:
    cls = METHODS.get(name)
    method = cls()
    student = _output((4, 4, 8), spatial)
    teacher = _output((4, 4, 8) if name == "fsp" else (6, 12, 16), spatial, seed=5)
    method.setup(student, teacher, _data())
    terms = method(student, teacher, _batch())
    assert set(terms) == set(cls.default_weights) - {"ce"}
    assert all(term.shape == () and torch.isfinite(term) for term in terms.values())
    assert cls.default_weights["ce"] == 1.0


def test_default_weights_and_taps_are_repdistillers() -> None:
    expected = {"fsp": 0.0, "rkd": 1.0, "sp": 3000.0, "pkt": 30000.0, "cc": 0.02}
    for name, weight in expected.items():
        assert METHODS.get(name).default_weights == {"ce": 1.0, name: weight}
    assert METHODS.get("fsp").student_taps == METHODS.get("fsp").teacher_taps == ("stem+stages",)
    assert METHODS.get("sp").student_taps == ("stage:-1",)
    for name in ("rkd", "pkt", "cc"):
        assert METHODS.get(name).student_taps == METHODS.get(name).teacher_taps == ("embedding",)


def test_fsp_setup_rejects_students_whose_fsp_matrices_do_not_fit() -> None:
    teacher = _output((4, 8, 8), (8,))
    with pytest.raises(ConfigError, match="8 channels in the student and 4 in the teacher"):
        FSP().setup(_output((8, 8, 8), (8,)), teacher, _data())
    with pytest.raises(ConfigError, match="student has 2 stem/stage outputs and the teacher 3"):
        FSP().setup(_output((4, 8), (8,)), teacher, _data())
    FSP().setup(_output((4, 8, 8), (16, 16)), _output((4, 8, 8), (32, 32)), _data())  # spatial sizes may differ


def test_fsp_initialisation_trains_the_student_feature_layers_only() -> None:
    method = FSP()
    assert method.init_epochs == 30 and method.init_lr is None
    torch.manual_seed(0)
    student, teacher = create_model("mnist1d_cnn"), create_model("mnist1d_cnn")
    params = method.init_parameters(student)
    assert {id(p) for p in params} == {id(p) for n, p in student.named_parameters() if not n.startswith("fc.")}
    x = torch.randn(4, 40)
    student_out = tapped_forward(student, FeatureTaps(student, method.student_taps), x)
    with torch.no_grad():
        teacher_out = tapped_forward(teacher, FeatureTaps(teacher, method.teacher_taps), x)
    method.setup(student_out, teacher_out, _data())
    terms = method.init_loss(student_out, teacher_out, _batch())
    assert set(terms) == {"fsp"} and terms["fsp"] > 0
    terms["fsp"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert student.fc.weight.grad is None


@pytest.mark.parametrize("spatial", [(16,), (8, 8)], ids=["1d", "2d"])
def test_cc_builds_linear_heads_for_both_models_and_trains_both(spatial: tuple[int, ...]) -> None:
    method = CorrelationCongruence()
    student = _output((4, 4, 8), spatial)
    teacher = _output((6, 12, 16), spatial, seed=5)
    method.setup(student, teacher, _data())
    assert method.embed_student is not None and method.embed_teacher is not None
    assert (method.embed_student.in_features, method.embed_student.out_features) == (8, 128)
    assert (method.embed_teacher.in_features, method.embed_teacher.out_features) == (16, 128)
    trainable = {id(p) for p in method.trainable_parameters()}
    assert trainable == {id(p) for head in (method.embed_student, method.embed_teacher) for p in head.parameters()}
    method(student, teacher, _batch())["cc"].backward()
    assert all(p.grad is not None for p in method.parameters())


@pytest.mark.parametrize(
    ("name", "make"),
    [("fsp", lambda: FSP(init_epochs=-1)), ("cc", lambda: CorrelationCongruence(feat_dim=0))],
)
def test_relation_methods_reject_bad_parameters(name: str, make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()
