"""CRD's parts against the paper's formulas and RepDistiller's rules, written out independently:
the NCE loss (float64, loops), the memory banks (scores, Z, momentum update), the other-class
negatives, and the crd / crd_kd methods (shapes, state in checkpoints, training on one batch)."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.data.base import DataInfo
from kdlab.errors import ConfigError
from kdlab.features import ModelOutput
from kdlab.losses import kd_loss
from kdlab.losses.contrastive import ContrastMemory, OtherClassSampler, crd_nce_loss
from kdlab.methods import METHODS
from kdlab.methods.crd import ContrastiveRepresentationDistillation, ContrastiveRepresentationDistillationKD

EPS = 1e-7  # RepDistiller's eps in ContrastLoss


def _paper_nce(scores: torch.Tensor, n_data: int) -> float:
    """Eq. 18 with Pn = 1/N, as RepDistiller computes it: P(D=1|x) = P / (P + K Pn + eps) for the
    positive (column 0), P(D=0|x) = K Pn / (P + K Pn + eps) for each negative; summed, mean over B."""
    total = 0.0
    for row in scores.tolist():
        k = len(row) - 1
        noise = k * (1.0 / n_data)
        total += math.log(row[0] / (row[0] + noise + EPS))
        total += sum(math.log(noise / (p + noise + EPS)) for p in row[1:])
    return -total / len(scores)


@pytest.mark.parametrize(("batch", "k", "n_data"), [(1, 1, 10), (5, 7, 10), (3, 20, 5), (4, 16, 50000)])
def test_crd_nce_loss_matches_the_paper_formula(batch: int, k: int, n_data: int) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + k)
    scores = torch.exp(torch.randn(batch, k + 1, generator=generator, dtype=torch.float64) * 3)
    value = crd_nce_loss(scores, n_data)
    assert value.dtype == torch.float64 and value.shape == ()
    assert value.item() == pytest.approx(_paper_nce(scores, n_data), rel=1e-12)


def test_crd_nce_loss_is_small_for_a_perfect_discriminator_and_positive_otherwise() -> None:
    perfect = torch.tensor([[1e12, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert 0 <= crd_nce_loss(perfect, 100).item() < 1e-4
    scores = torch.rand(6, 9, dtype=torch.float64) + 0.1
    assert crd_nce_loss(scores, 100).item() > 0
    assert crd_nce_loss(perfect.flip(1) + 1e-3, 100).item() > 1  # the positive scored like a negative


def test_crd_nce_loss_gradient_matches_autograd_of_the_formula() -> None:
    """d/dP of -log(P / (P + c + eps)) and of -log(c / (P + c + eps)), averaged over the batch."""
    scores = (torch.rand(3, 5, dtype=torch.float64) + 0.5).requires_grad_()
    n_data = 8
    crd_nce_loss(scores, n_data).backward()
    c = 4 / n_data
    p = scores.detach()
    expected = torch.empty_like(p)
    expected[:, 0] = -(1 / p[:, 0] - 1 / (p[:, 0] + c + EPS))
    expected[:, 1:] = 1 / (p[:, 1:] + c + EPS)
    torch.testing.assert_close(scores.grad, expected / 3, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("shape", [(4,), (4, 1), (2, 3, 4)])
def test_crd_nce_loss_rejects_scores_without_negatives(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="scores"):
        crd_nce_loss(torch.ones(shape), 10)


def _unit(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def test_memory_starts_uniform_with_unset_normalizer_and_lives_in_the_state_dict() -> None:
    torch.manual_seed(0)
    memory = ContrastMemory(dim=12, n_data=500)
    bound = 1 / math.sqrt(12 / 3)
    for bank in (memory.memory_student, memory.memory_teacher):
        assert bank.shape == (500, 12) and bank.dtype == torch.float32
        assert bank.abs().max() <= bound and bank.min() < -0.9 * bound and bank.max() > 0.9 * bound
        assert bank.norm(dim=1).square().mean().item() == pytest.approx(1.0, abs=0.05)  # unit in expectation
    assert not torch.equal(memory.memory_student, memory.memory_teacher)
    assert memory.normalizer.tolist() == [-1.0, -1.0]
    assert set(memory.state_dict()) == {"memory_student", "memory_teacher", "normalizer"}


def test_memory_scores_normalizer_and_momentum_update_follow_the_reference() -> None:
    """Scores exp(a . m_j / T) / Z against the *old* bank, Z = N * mean of the first batch's
    exp-scores (then fixed), and m <- normalise(mu m + (1 - mu) v) on the batch's rows only."""
    generator = torch.Generator().manual_seed(1)
    n, dim, k, temperature, momentum = 30, 6, 9, 0.07, 0.3  # not 0.5, so old and new are told apart
    memory = ContrastMemory(dim, n, temperature, momentum).double()
    normalizers = []
    for _ in range(2):
        index = torch.randperm(n, generator=generator)[:4]
        negatives = torch.randint(0, n, (4, k), generator=generator)
        student, teacher = _unit(4, dim, generator), _unit(4, dim, generator)
        old_student_bank, old_teacher_bank = memory.memory_student.clone(), memory.memory_teacher.clone()
        scores_student, scores_teacher = memory(student, teacher, index, negatives)
        assert scores_student.shape == scores_teacher.shape == (4, k + 1)

        raw_student = torch.empty(4, k + 1, dtype=torch.float64)
        raw_teacher = torch.empty(4, k + 1, dtype=torch.float64)
        for b in range(4):
            rows = [index[b].item(), *negatives[b].tolist()]
            for j, row in enumerate(rows):
                raw_student[b, j] = math.exp(float(student[b] @ old_teacher_bank[row]) / temperature)
                raw_teacher[b, j] = math.exp(float(teacher[b] @ old_student_bank[row]) / temperature)
        if not normalizers:  # the first batch sets Z for good
            normalizers = [n * raw_student.mean().item(), n * raw_teacher.mean().item()]
        assert memory.normalizer.tolist() == pytest.approx(normalizers, rel=1e-12)
        torch.testing.assert_close(scores_student, raw_student / normalizers[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(scores_teacher, raw_teacher / normalizers[1], rtol=1e-12, atol=0)

        for bank, old, new in (
            (memory.memory_student, old_student_bank, student),
            (memory.memory_teacher, old_teacher_bank, teacher),
        ):
            expected = old.clone()
            for b in range(4):
                moved = momentum * old[index[b]] + (1 - momentum) * new[b]
                expected[index[b]] = moved / math.sqrt(float(moved @ moved))
            torch.testing.assert_close(bank, expected, rtol=1e-12, atol=1e-15)
            assert torch.allclose(bank[index].norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_memory_gradient_equals_scoring_the_gathered_rows() -> None:
    """The anchors' gradient is that of exp(a . m_j / T) over the sampled rows (RepDistiller's bmm)."""
    generator = torch.Generator().manual_seed(2)
    n, dim, k = 20, 5, 7
    memory = ContrastMemory(dim, n).double()
    index = torch.tensor([3, 11, 0])
    negatives = torch.randint(0, n, (3, k), generator=generator)
    negatives[0, :3] = 5  # repeated negatives count once per draw
    student = _unit(3, dim, generator).requires_grad_()
    teacher = _unit(3, dim, generator).requires_grad_()
    banks = memory.memory_student.clone(), memory.memory_teacher.clone()
    scores_student, scores_teacher = memory(student, teacher, index, negatives)
    loss = crd_nce_loss(scores_student, n) + crd_nce_loss(scores_teacher, n)
    loss.backward()

    z = memory.normalizer
    rows = torch.cat([index[:, None], negatives], 1)
    a, b = student.detach().clone().requires_grad_(), teacher.detach().clone().requires_grad_()
    reference_student = torch.exp(torch.bmm(banks[1][rows], a[:, :, None]).squeeze(2) / 0.07) / z[0]
    reference_teacher = torch.exp(torch.bmm(banks[0][rows], b[:, :, None]).squeeze(2) / 0.07) / z[1]
    (crd_nce_loss(reference_student, n) + crd_nce_loss(reference_teacher, n)).backward()
    torch.testing.assert_close(student.grad, a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(teacher.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_sampler_draws_only_other_classes_uniformly_and_reproducibly() -> None:
    targets = torch.tensor([2, 0, 1, 2, 2, 0, 4, 1, 2, 0])  # class 3 is absent
    sampler = OtherClassSampler(targets, num_classes=5)
    classes = torch.tensor([0, 1, 2, 4, 3])
    torch.manual_seed(7)
    drawn = sampler(classes, 4000)
    assert drawn.shape == (5, 4000) and drawn.dtype == torch.long
    for row, c in zip(drawn, classes.tolist(), strict=True):
        assert (targets[row] != c).all()
        allowed = (targets != c).nonzero().flatten()
        assert set(row.tolist()) == set(allowed.tolist())  # every other-class sample can be drawn
        frequency = torch.bincount(row, minlength=len(targets))[allowed].double() / row.numel()
        assert (frequency - 1 / len(allowed)).abs().max() < 0.035  # uniform over them
    torch.manual_seed(7)
    assert torch.equal(sampler(classes, 4000), drawn)
    assert sampler.state_dict() == {}  # derived from the labels: not saved


def test_sampler_handles_tiny_data_and_refuses_a_single_class() -> None:
    sampler = OtherClassSampler(torch.tensor([0, 1]), num_classes=2)
    assert sampler(torch.tensor([0, 1]), 50).tolist() == [[1] * 50, [0] * 50]  # K > N: with replacement
    with pytest.raises(ValueError, match="same class"):
        OtherClassSampler(torch.tensor([3, 3, 3]), num_classes=4)


def _outputs(batch: int, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> tuple[ModelOutput, ...]:
    generator = torch.Generator().manual_seed(batch)
    student = ModelOutput(torch.randn(batch, 5, generator=generator), {"embedding": torch.randn(batch, *student_shape)})
    teacher = ModelOutput(torch.randn(batch, 5, generator=generator), {"embedding": torch.randn(batch, *teacher_shape)})
    return student, teacher


def _data(n: int = 60, classes: int = 5) -> DataInfo:
    return DataInfo(n, classes, torch.arange(n) % classes)


def _batch(index: list[int], data: DataInfo) -> dict[str, torch.Tensor]:
    index_tensor = torch.tensor(index)
    return {"input": torch.zeros(len(index)), "target": data.targets[index_tensor], "index": index_tensor}


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((8,), (24,)), ((8, 11), (25, 11)), ((4, 3, 3), (16, 2, 2))],  # vectors, 1-D and 2-D feature maps
)
def test_crd_setup_builds_heads_memory_and_sampler_from_the_shapes(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
) -> None:
    method = ContrastiveRepresentationDistillation(feat_dim=16, nce_k=40)
    data = _data()
    student, teacher = _outputs(6, student_shape, teacher_shape)
    method.setup(*_outputs(2, student_shape, teacher_shape), data)
    assert method.embed_student.linear.in_features == math.prod(student_shape)
    assert method.embed_teacher.linear.in_features == math.prod(teacher_shape)
    assert method.embed_student.linear.out_features == method.embed_teacher.linear.out_features == 16
    assert method.memory.memory_student.shape == method.memory.memory_teacher.shape == (60, 16)
    terms = method(student, teacher, _batch([0, 7, 13, 21, 34, 59], data))
    assert set(terms) == {"crd"} and terms["crd"].shape == () and torch.isfinite(terms["crd"])
    assert {"ce", *terms} == set(method.default_weights)
    # The heads train with the student; the banks are state, not parameters.
    assert {id(p) for p in method.trainable_parameters()} == {
        id(p) for head in (method.embed_student, method.embed_teacher) for p in head.parameters()
    }


def test_crd_defaults_and_weights_follow_repdistiller() -> None:
    crd, crd_kd = METHODS.get("crd"), METHODS.get("crd_kd")
    assert crd.default_weights == {"ce": 1.0, "crd": 0.8}
    assert crd_kd.default_weights == {"ce": 1.0, "kd": 1.0, "crd": 0.8}
    method = crd_kd()
    assert (method.feat_dim, method.nce_k, method.nce_temperature, method.nce_momentum) == (128, 16384, 0.07, 0.5)
    assert method.temperature == 4.0
    assert crd.student_taps == crd.teacher_taps == ("embedding",)
    for bad in ({"nce_k": 0}, {"nce_temperature": 0.0}, {"nce_momentum": 1.0}):
        with pytest.raises(ValueError):
            crd(**bad)


def test_crd_kd_adds_hinton_kd_at_temperature_4() -> None:
    method = ContrastiveRepresentationDistillationKD(feat_dim=8, nce_k=10)
    data = _data()
    student, teacher = _outputs(4, (6,), (9,))
    method.setup(student, teacher, data)
    terms = method(student, teacher, _batch([1, 2, 3, 4], data))
    assert set(terms) == {"kd", "crd"} == set(method.default_weights) - {"ce"}
    torch.testing.assert_close(terms["kd"], kd_loss(student.logits, teacher.logits, 4.0))


def test_crd_state_dict_holds_banks_and_z_so_a_resumed_method_continues_exactly() -> None:
    data = _data()
    student, teacher = _outputs(4, (6,), (9,))
    torch.manual_seed(3)
    first = ContrastiveRepresentationDistillation(feat_dim=8, nce_k=32)
    first.setup(student, teacher, data)
    first(student, teacher, _batch([0, 1, 2, 3], data))  # sets Z and moves the banks
    state = first.state_dict()
    assert {"memory.memory_student", "memory.memory_teacher", "memory.normalizer"} <= set(state)
    assert state["memory.normalizer"].min() > 0

    torch.manual_seed(4)  # a fresh process: other random banks and heads until the checkpoint loads
    resumed = ContrastiveRepresentationDistillation(feat_dim=8, nce_k=32)
    resumed.setup(student, teacher, data)
    resumed.load_state_dict(state)
    batch = _batch([10, 21, 32, 43], data)
    torch.manual_seed(5)
    expected = first(student, teacher, batch)["crd"]
    torch.manual_seed(5)
    torch.testing.assert_close(resumed(student, teacher, batch)["crd"], expected, rtol=0, atol=0)
    for key in ("memory.memory_student", "memory.memory_teacher", "memory.normalizer"):
        assert torch.equal(first.state_dict()[key], resumed.state_dict()[key])


def test_crd_refuses_a_training_split_of_one_class() -> None:
    method = ContrastiveRepresentationDistillation()
    with pytest.raises(ConfigError, match=r"crd.*same class"):
        method.setup(*_outputs(2, (6,), (9,)), DataInfo(5, 3, torch.zeros(5, dtype=torch.long)))


def test_crd_loss_decreases_when_training_on_one_batch() -> None:
    """Student features and both heads trained on one batch against a fixed teacher: the CRD term falls."""
    torch.manual_seed(0)
    data = _data(n=200, classes=10)
    method = ContrastiveRepresentationDistillation(feat_dim=16, nce_k=256)
    batch = _batch(list(range(0, 200, 12)), data)
    features = torch.randn(len(batch["index"]), 12, requires_grad=True)
    teacher = ModelOutput(torch.zeros(len(batch["index"]), 10), {"embedding": torch.randn(len(batch["index"]), 20)})
    method.setup(ModelOutput(torch.zeros(2, 10), {"embedding": features[:2].detach()}), teacher, data)
    optimizer = torch.optim.SGD([features, *method.trainable_parameters()], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = method(ModelOutput(torch.zeros(1), {"embedding": features}), teacher, batch)["crd"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
