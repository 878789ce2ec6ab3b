"""Feature-based losses (FitNet, AT, NST, AB, FT, VID) against the papers' formulas, and their methods.

The formulas are written out here independently (float64, loops over samples and channels, plain
tensor math), on 1-D ``[B, C, L]`` and 2-D ``[B, C, H, W]`` maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kdlab.config import TrainConfig
from kdlab.data.base import DataInfo
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput, classifier_parameters, feature_layout, resolve_tap, tapped_forward
from kdlab.losses.feature import (
    ab_loss,
    at_loss,
    factor_transfer_loss,
    hint_loss,
    nst_loss,
    pool_to_match,
    vid_loss,
)
from kdlab.methods import METHODS
from kdlab.methods.ab import ActivationBoundaries
from kdlab.methods.adapters import ConvReg
from kdlab.methods.at import AttentionTransfer
from kdlab.methods.fitnet import FitNet, parameters_up_to
from kdlab.methods.ft import FactorTransfer
from kdlab.methods.nst import NeuronSelectivityTransfer
from kdlab.methods.vid import VariationalInformationDistillation
from kdlab.models import create_model
from kdlab.schemes import SCHEMES, FrozenTeacher, SystemParts


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block_mean(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average non-overlapping ``factor``-wide blocks in every spatial dimension (exact pooling)."""
    batch, channels, *size = x.shape
    split = [batch, channels]
    for s in size:
        split += [s // factor, factor]
    return x.reshape(split).mean(dim=tuple(range(3, 2 + 2 * len(size), 2)))


# Pairs of (student, teacher) shapes: 1-D and 2-D, equal or different channels, student map larger,
# teacher map larger.
SHAPES = [
    ((3, 4, 10), (3, 6, 10)),
    ((3, 4, 6, 6), (3, 4, 6, 6)),
    ((2, 5, 8, 8), (2, 3, 4, 4)),
    ((2, 3, 5), (2, 7, 10)),
    ((1, 4, 4, 4), (1, 6, 4, 4)),
]


def _pooled(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s_size, t_size = student.shape[2], teacher.shape[2]
    if s_size > t_size:
        return _block_mean(student, s_size // t_size), teacher
    if t_size > s_size:
        return student, _block_mean(teacher, t_size // s_size)
    return student, teacher


def test_pool_to_match_averages_the_larger_map_down() -> None:
    s, t = _randn(2, 3, 8, 8), _randn(2, 5, 4, 4, seed=1)
    ps, pt = pool_to_match(s, t)
    torch.testing.assert_close(ps, _block_mean(s, 2))
    assert pt is t
    s1, t1 = _randn(2, 3, 5), _randn(2, 4, 10, seed=1)
    ps1, pt1 = pool_to_match(s1, t1)
    assert ps1 is s1
    torch.testing.assert_close(pt1, _block_mean(t1, 2))
    with pytest.raises(ValueError, match="spatial"):
        pool_to_match(_randn(2, 3), _randn(2, 3))


# ----------------------------------------------------------------------------------------- FitNet


def test_hint_loss_is_the_mean_squared_error() -> None:
    s, t = _randn(2, 3, 4, 4), _randn(2, 3, 4, 4, seed=1)
    expected = sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True)) / s.numel()
    assert hint_loss(s, t).item() == pytest.approx(expected, rel=1e-12)
    assert hint_loss(s, s.clone()).item() == 0.0
    with pytest.raises(ValueError, match="hint shapes"):
        hint_loss(s, t[:, :2])


# --------------------------------------------------------------------------------------------- AT


def _paper_at(student: torch.Tensor, teacher: torch.Tensor, p: float) -> float:
    """Zagoruyko & Komodakis: Q = vec(sum_c A_c^p) / ||.||_2 (the channel mean, like the authors),
    then the mean over samples and positions of (Q_S - Q_T)^2."""
    student, teacher = _pooled(student, teacher)
    total, count = 0.0, 0
    for s_map, t_map in zip(student, teacher, strict=True):
        maps = []
        for feature in (s_map, t_map):
            flat = feature.reshape(feature.shape[0], -1)
            attention = [
                sum(flat[c, j].item() ** p for c in range(flat.shape[0])) / flat.shape[0] for j in range(flat.shape[1])
            ]
            norm = math.sqrt(sum(a * a for a in attention))
            maps.append([a / norm for a in attention])
        total += sum((a - b) ** 2 for a, b in zip(*maps, strict=True))
        count += len(maps[0])
    return total / count


@pytest.mark.parametrize(("s_shape", "t_shape"), SHAPES)
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_at_loss_matches_the_paper_formula(s_shape: tuple[int, ...], t_shape: tuple[int, ...], p: float) -> None:
    s, t = _randn(*s_shape).relu(), _randn(*t_shape, seed=1).relu()
    assert at_loss(s, t, p).item() == pytest.approx(_paper_at(s, t, p), rel=1e-10)


def test_at_loss_is_zero_for_the_same_attention() -> None:
    s = _randn(2, 4, 5, 5)
    assert at_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-15)
    # only the normalised channel-mean of squares matters: channel count and overall scale do not
    assert at_loss(s, 3 * torch.cat([s, s], dim=1)).item() == pytest.approx(0.0, abs=1e-15)
    assert at_loss(s, _randn(2, 4, 5, 5, seed=3)).item() > 0


# -------------------------------------------------------------------------------------------- NST


def _paper_nst(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Huang & Wang, eq. (5) with k(x, y) = (x^T y)^2 on channel maps normalised over positions."""
    student, teacher = _pooled(student, teacher)

    def rows(feature: torch.Tensor) -> list[torch.Tensor]:
        flat = feature.reshape(feature.shape[0], -1)
        return [row / row.norm() for row in flat]

    def kernel_mean(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
        return sum(float(x @ y) ** 2 for x in xs for y in ys) / (len(xs) * len(ys))

    total = 0.0
    for s_map, t_map in zip(student, teacher, strict=True):
        f, g = rows(s_map), rows(t_map)
        total += kernel_mean(g, g) + kernel_mean(f, f) - 2 * kernel_mean(f, g)
    return total / len(student)


@pytest.mark.parametrize(("s_shape", "t_shape"), SHAPES)
def test_nst_loss_matches_the_paper_formula(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    s, t = _randn(*s_shape), _randn(*t_shape, seed=1)
    assert nst_loss(s, t).item() == pytest.approx(_paper_nst(s, t), rel=1e-10)


def test_nst_loss_is_zero_for_identical_maps_and_its_teacher_term_is_constant() -> None:
    s = _randn(2, 4, 3, 3)
    assert nst_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-14)
    # per-channel scale and channel order do not change the set of normalised patterns
    assert nst_loss(s, 2 * s.flip(1)).item() == pytest.approx(0.0, abs=1e-14)
    teacher = _randn(2, 5, 3, 3, seed=2).requires_grad_()
    nst_loss(s, teacher).backward()
    # only the cross term reaches the teacher: its gradient is that of -2 mean k(f, g)
    cross = teacher.detach().clone().requires_grad_()
    f = torch.nn.functional.normalize(s.flatten(2), dim=2)
    g = torch.nn.functional.normalize(cross.flatten(2), dim=2)
    (-2 * torch.einsum("bid,bjd->bij", f, g).pow(2).mean()).backward()
    torch.testing.assert_close(teacher.grad, cross.grad)


# --------------------------------------------------------------------------------------------- AB


def _paper_ab(students: list[torch.Tensor], teachers: list[torch.Tensor], margin: float) -> float:
    """Heo et al. eq. (6): ||rho(T) * relu(m - S) + (1 - rho(T)) * relu(m + S)||^2 per layer, with
    RepDistiller's layer weights 2^(l-n+1) and scale 3 / (1000 B)."""
    n, total = len(students), 0.0
    for layer, (s, t) in enumerate(zip(students, teachers, strict=True)):
        rho = (t > 0).double()
        per_element = rho * torch.relu(margin - s) + (1 - rho) * torch.relu(margin + s)
        total += 2.0 ** (layer - n + 1) * per_element.pow(2).sum().item()
    return total / students[0].shape[0] * 3 / 1000


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_ab_loss_matches_the_paper_formula(margin: float, batch: int) -> None:
    students = [_randn(batch, 4, 6, seed=1), _randn(batch, 5, 3, 3, seed=2), _randn(batch, 6, 2, seed=3)]
    teachers = [_randn(*s.shape, seed=10 + i) for i, s in enumerate(students)]
    assert ab_loss(students, teachers, margin).item() == pytest.approx(_paper_ab(students, teachers, margin), rel=1e-12)


def test_ab_loss_is_zero_only_beyond_the_margin_on_the_teachers_side() -> None:
    teacher = _randn(2, 3, 4, 4)
    assert ab_loss([2 * teacher.sign() * 1.01], [teacher]).item() == 0.0  # |S| > m on the right side
    assert ab_loss([teacher.clone()], [teacher]).item() > 0  # same values, but inside the margin
    with pytest.raises(ValueError, match="layer 0"):
        ab_loss([teacher], [teacher[:, :2]])


# --------------------------------------------------------------------------------------------- FT


def _paper_ft(student: torch.Tensor, teacher: torch.Tensor, p: float) -> float:
    """RepDistiller's factor distance: per sample, a_j = mean_c F_c,j^2 normalised, then mean |a_S - a_T|^p."""
    student, teacher = _pooled(student, teacher)
    total, count = 0.0, 0
    for s_map, t_map in zip(student, teacher, strict=True):
        factors = []
        for feature in (s_map, t_map):
            flat = feature.reshape(feature.shape[0], -1)
            a = [
                sum(flat[c, j].item() ** 2 for c in range(flat.shape[0])) / flat.shape[0] for j in range(flat.shape[1])
            ]
            norm = math.sqrt(sum(v * v for v in a))
            factors.append([v / norm for v in a])
        total += sum(abs(x - y) ** p for x, y in zip(*factors, strict=True))
        count += len(factors[0])
    return total / count


@pytest.mark.parametrize(("s_shape", "t_shape"), SHAPES)
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_factor_transfer_loss_matches_the_formula(s_shape: tuple[int, ...], t_shape: tuple[int, ...], p: float) -> None:
    s, t = _randn(*s_shape), _randn(*t_shape, seed=1)
    assert factor_transfer_loss(s, t, p).item() == pytest.approx(_paper_ft(s, t, p), rel=1e-10)


def test_factor_transfer_loss_is_zero_for_identical_factors() -> None:
    f = _randn(1, 3, 4, 4)
    assert factor_transfer_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert factor_transfer_loss(f, -5 * f).item() == pytest.approx(0.0, abs=1e-15)


# -------------------------------------------------------------------------------------------- VID


@pytest.mark.parametrize("shape", [(1, 3, 5), (2, 4, 3, 3)])
def test_vid_loss_is_the_gaussian_negative_log_likelihood(shape: tuple[int, ...]) -> None:
    mean, target = _randn(*shape), _randn(*shape, seed=1)
    variance = torch.rand(shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    total = 0.0
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        var = variance[index[1]].item()
        total += 0.5 * ((mean[tuple(index)] - target[tuple(index)]).item() ** 2 / var + math.log(var))
    assert vid_loss(mean, target, variance).item() == pytest.approx(total / mean.numel(), rel=1e-12)
    # = -log N(t; mu, var) minus the constant log(2 pi) / 2
    normal = torch.distributions.Normal(mean, variance.view(1, -1, *[1] * (len(shape) - 2)).sqrt())
    nll = -normal.log_prob(target).mean() - 0.5 * math.log(2 * math.pi)
    assert vid_loss(mean, target, variance).item() == pytest.approx(nll.item(), rel=1e-12)
    with pytest.raises(ValueError, match="variance"):
        vid_loss(mean, target, variance[:-1])


# ---------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "layer"),
    [
        ((2, 8, 16, 16), (2, 32, 8, 8), nn.Conv2d),  # student twice the teacher: strided conv
        ((2, 8, 8, 8), (2, 32, 16, 16), nn.ConvTranspose2d),  # half: transposed conv
        ((2, 8, 8, 8), (2, 32, 8, 8), nn.Conv2d),  # equal: 1x1 conv
        ((2, 8, 7, 7), (2, 32, 4, 4), nn.Conv2d),  # larger: a 4x4 conv
        ((2, 8, 20), (2, 25, 10), nn.Conv1d),
        ((2, 8, 19), (2, 25, 10), nn.Conv1d),
        ((2, 8, 5), (2, 25, 10), nn.ConvTranspose1d),
        ((2, 8, 4), (2, 25, 7), nn.ConvTranspose1d),  # smaller, not half: beyond the reference
    ],
)
def test_conv_regressor_maps_student_maps_onto_teacher_maps(
    s_shape: tuple[int, ...], t_shape: tuple[int, ...], layer: type[nn.Module]
) -> None:
    regressor = ConvReg(s_shape, t_shape)
    assert type(regressor.conv) is layer
    out = regressor(torch.randn(s_shape))
    assert out.shape == t_shape and out.min() >= 0
    if s_shape[2:] == t_shape[2:]:
        assert regressor.conv.kernel_size == (1,) * (len(s_shape) - 2)
    assert ConvReg(s_shape, t_shape, use_relu=False)(torch.randn(s_shape)).min() < 0
    with pytest.raises(ConfigError, match="feature map"):
        ConvReg((2, 8), (2, 25))


def _dependencies(model: nn.Module, spec: str, inputs: torch.Tensor) -> set[int]:
    """Ids of the parameters a tapped feature depends on, by autograd."""
    taps = FeatureTaps(model, (spec,))
    feature = tapped_forward(model.eval(), taps, inputs).features[spec]
    taps.remove()
    params = list(model.parameters())
    grads = torch.autograd.grad(feature.sum(), params, allow_unused=True)
    return {id(p) for p, g in zip(params, grads, strict=True) if g is not None}


@pytest.mark.parametrize(
    "model_name", ["mnist1d_cnn", "resnet8x4", "vgg8", "wrn_16_1", "mobilenetv2", "shufflenetv1", "shufflenetv2"]
)
def test_parameters_up_to_a_tap_are_exactly_those_it_depends_on(model_name: str) -> None:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    inputs = torch.randn(2, 40) if model_name.startswith("mnist1d") else torch.randn(2, 3, 32, 32)
    layout = feature_layout(model)
    specs = [f"stage:{k}" for k in range(len(layout.stages))]
    specs += [f"preact:{k}" for k in range(len(layout.preacts or ()))]
    for spec in specs:
        tap = resolve_tap(model, spec)
        assert isinstance(tap, str)
        chosen = {id(p) for p in parameters_up_to(model, tap)}
        assert chosen == _dependencies(model, spec, inputs), f"{model_name} {spec}"
        assert not chosen & classifier_parameters(model)


# ---------------------------------------------------------------------------------------- methods


def _outputs(
    method: nn.Module, student: nn.Module, teacher: nn.Module, inputs: torch.Tensor
) -> tuple[ModelOutput, ModelOutput]:
    outputs = []
    for model, specs in ((student, method.student_taps), (teacher, method.teacher_taps)):
        taps = FeatureTaps(model, specs)
        outputs.append(tapped_forward(model, taps, inputs))
        taps.remove()
    return outputs[0], outputs[1]


def _set_up(method: nn.Module, student: nn.Module, teacher: nn.Module, inputs: torch.Tensor) -> None:
    """As the pipeline's dry run: both models in eval mode, two samples."""
    with torch.no_grad():
        s, t = _outputs(method, student.eval(), teacher.eval(), inputs[:2])
    student.train()
    method.setup(s, t, DataInfo(num_samples=8, num_classes=10, targets=torch.zeros(8, dtype=torch.long)))


def _mnist1d_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("mnist1d_cnn", channels=8), create_model("mnist1d_cnn"), torch.randn(4, 40)


def _cifar_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10), create_model("resnet8x4", num_classes=10), torch.randn(4, 3, 32, 32)


def _system(method: nn.Module, student: nn.Module, teacher: nn.Module, stage: str = "main") -> nn.Module:
    parts = SystemParts(
        student=student,
        method=method,
        weights=dict(method.default_weights),
        train=TrainConfig(),
        num_classes=10,
        teachers=[FrozenTeacher(teacher, method.teacher_taps)],
        stage=stage,
    )
    return SCHEMES.get("offline")(parts)


def _optimised(system: nn.Module) -> set[int]:
    return {id(p) for group in system.configure_optimizers()["optimizer"].param_groups for p in group["params"]}


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("fitnet", {"ce": 1.0, "hint": 100.0}),
        ("at", {"ce": 1.0, "at": 1000.0}),
        ("nst", {"ce": 1.0, "nst": 50.0}),
        ("ab", {"ce": 1.0}),
        ("ft", {"ce": 1.0, "ft": 200.0}),
        ("vid", {"ce": 1.0, "vid": 1.0}),
    ],
)
@pytest.mark.parametrize("pair", [_mnist1d_pair, _cifar_pair])
def test_methods_return_their_weighted_terms_on_1d_and_2d_features(
    name: str, weights: dict[str, float], pair: Callable[[], tuple[nn.Module, nn.Module, torch.Tensor]]
) -> None:
    cls = METHODS.get(name)
    assert dict(cls.default_weights) == weights
    student, teacher, inputs = pair()
    method = cls()
    _set_up(method, student, teacher, inputs)
    s, t = _outputs(method, student, teacher, inputs)
    terms = method(s, t, {"input": inputs})
    assert set(terms) == set(weights) - {"ce"}
    assert all(term.ndim == 0 and torch.isfinite(term) for term in terms.values())


def test_fitnet_regressor_and_two_stage_option() -> None:
    student, teacher, inputs = _mnist1d_pair()
    method = FitNet()
    assert method.init_epochs == 0 and method.student_taps == method.teacher_taps == ("stage:1",)
    _set_up(method, student, teacher, inputs)
    assert isinstance(method.regressor.conv, nn.Conv1d)
    assert method.regressor.conv.in_channels == 8 and method.regressor.conv.out_channels == 25
    s, t = _outputs(method, student, teacher, inputs)
    expected = hint_loss(method.regressor(s.features["stage:1"]), t.features["stage:1"])
    torch.testing.assert_close(method(s, t, {"input": inputs})["hint"], expected)

    method = FitNet(init_epochs=5)
    _set_up(method, student, teacher, inputs)
    system = _system(method, student, teacher, stage="init")
    guided = [*student.layer1.parameters(), *student.layer2.parameters()]
    assert _optimised(system) == {id(p) for p in [*guided, *method.regressor.parameters()]}
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    optimizer = system.configure_optimizers()["optimizer"]
    batch = {"input": inputs, "target": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}
    terms = system.loss_terms(batch)
    assert set(terms) == {"hint"}
    terms["hint"].backward()
    optimizer.step()
    changed = {name for name, p in student.named_parameters() if not torch.equal(before[name], p)}
    assert changed == {name for name, _ in student.named_parameters() if name.startswith(("layer1", "layer2"))}
    with pytest.raises(ValueError, match="init_epochs"):
        FitNet(init_epochs=-1)


def test_fitnet_rejects_a_list_hint_and_flat_features() -> None:
    student, teacher, inputs = _mnist1d_pair()
    with pytest.raises(ConfigError, match="one layer"):
        _set_up(FitNet(hint="stages"), student, teacher, inputs)
    with pytest.raises(ConfigError, match="feature map"):
        _set_up(FitNet(hint="embedding"), student, teacher, inputs)


def test_at_and_nst_sum_over_stage_pairs_and_zip_to_the_shorter_list() -> None:
    s_feats = [_randn(2, 4, 8, 8), _randn(2, 8, 4, 4, seed=1), _randn(2, 16, 2, 2, seed=2)]
    t_feats = [_randn(2, 6, 8, 8, seed=3), _randn(2, 12, 4, 4, seed=4)]
    s = ModelOutput(torch.zeros(2, 10, dtype=torch.float64), {"stages": s_feats})
    t = ModelOutput(torch.zeros(2, 10, dtype=torch.float64), {"stages": t_feats})
    at = AttentionTransfer()(s, t, {})["at"]
    assert at.item() == pytest.approx(sum(at_loss(a, b).item() for a, b in zip(s_feats, t_feats, strict=False)))
    nst = NeuronSelectivityTransfer()(s, t, {})["nst"]
    assert nst.item() == pytest.approx(sum(nst_loss(a, b).item() for a, b in zip(s_feats, t_feats, strict=False)))


def test_ab_connectors_init_stage_and_a_ce_only_main_stage() -> None:
    student, teacher, inputs = _cifar_pair()
    method = ActivationBoundaries()
    assert method.init_epochs == 30 and method.student_taps == ("preacts",)
    _set_up(method, student, teacher, inputs)
    # resnet8 (16/32/64 channels) -> resnet8x4 (64/128/256): a 1x1 conv + BN per stage
    assert len(method.connectors) == 3
    for connector, channels in zip(method.connectors, (64, 128, 256), strict=True):
        assert isinstance(connector, ConvReg) and isinstance(connector.relu, nn.Identity)
        assert connector.conv.kernel_size == (1, 1) and connector.conv.out_channels == channels

    s, t = _outputs(method, student, teacher, inputs)
    assert method(s, t, {}) == {}
    assert list(method.trainable_parameters()) == []
    init = _system(method, student, teacher, stage="init")
    head = classifier_parameters(student)
    assert _optimised(init) == {id(p) for p in student.parameters() if id(p) not in head} | {
        id(p) for p in method.connectors.parameters()
    }
    connected = [c(f) for c, f in zip(method.connectors, s.features["preacts"], strict=True)]
    torch.testing.assert_close(method.init_loss(s, t, {})["ab"], ab_loss(connected, t.features["preacts"]))
    main = _system(method, student, teacher)
    assert _optimised(main) == {id(p) for p in student.parameters()}

    same = ActivationBoundaries()
    _set_up(same, student, student, inputs)  # equal shapes: identity connectors
    assert all(isinstance(c, nn.Identity) for c in same.connectors)


def test_ft_paraphraser_translator_and_stages() -> None:
    student, teacher, inputs = _mnist1d_pair()
    method = FactorTransfer()
    assert method.init_epochs == 30 and method.init_lr is None
    _set_up(method, student, teacher, inputs)
    # teacher stage:-1 has 25 channels -> int(25 * 0.5) = 12 factors; the paraphraser has no BN
    para, trans = method.paraphraser, method.translator
    assert [m.out_channels for m in para.encoder if isinstance(m, nn.Conv1d)] == [25, 12, 12]
    assert [m.out_channels for m in para.decoder if isinstance(m, nn.ConvTranspose1d)] == [12, 25, 25]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in para.modules())
    assert all(m.negative_slope == 0.1 for m in para.modules() if isinstance(m, nn.LeakyReLU))
    assert [type(m) for m in trans] == [nn.Conv1d, nn.BatchNorm1d, nn.LeakyReLU] * 3
    assert [m.out_channels for m in trans if isinstance(m, nn.Conv1d)] == [8, 12, 12]

    init = _system(method, student, teacher, stage="init")
    assert _optimised(init) == {id(p) for p in para.parameters()}
    init.train()
    assert para.training
    s, t = _outputs(method, student, teacher, inputs)
    feature = t.features["stage:-1"]
    expected = torch.nn.functional.mse_loss(para.decoder(para.encoder(feature)), feature)
    torch.testing.assert_close(method.init_loss(s, t, {})["reconstruction"], expected)

    main = _system(method, student, teacher)
    assert _optimised(main) == {id(p) for p in [*student.parameters(), *trans.parameters()]}
    main.train()
    assert not para.training and trans.training
    loss = method(s, t, {})["ft"]
    torch.testing.assert_close(loss, factor_transfer_loss(trans(s.features["stage:-1"]), para.encoder(feature)))
    loss.backward()
    assert all(p.grad is None for p in para.parameters())


def test_vid_heads_start_at_the_initial_variance() -> None:
    student, teacher, inputs = _cifar_pair()
    method = VariationalInformationDistillation()
    _set_up(method, student, teacher, inputs)
    assert len(method.heads) == 3
    for head, (s_c, t_c) in zip(method.heads, ((16, 64), (32, 128), (64, 256)), strict=True):
        convs = [m for m in head.regressor if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [(s_c, t_c), (t_c, t_c), (t_c, t_c)]
        assert all(c.kernel_size == (1, 1) and c.bias is None for c in convs)
        torch.testing.assert_close(head.variance(), torch.full((t_c,), 5.0))
    s, t = _outputs(method, student, teacher, inputs)
    expected = sum(
        vid_loss(h.regressor(a), b, h.variance())
        for h, a, b in zip(method.heads, s.features["stages"], t.features["stages"], strict=True)
    )
    torch.testing.assert_close(method(s, t, {})["vid"], expected)
