"""The LM soft-label store: a tiny GPT-2 teacher written to real files, read back, and checked against
the dense KL computed online with an independent float64 formula (top-k at k = V, the residual
bucket, renormalised top-k, random sampling's unbiasedness, masking, and refusals)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from kdlab.errors import ConfigError
from kdlab.files import file_sha256
from kdlab.lm.store import LMSoftLabelStore, SparseTargets, sparse_forward_kl, write_lm_store

V, T = 259, 16
DATA = {"name": "random-bytes", "block": T, "split": "train"}


def _gpt2(seed: int, layers: int = 2, sharpen: float = 1.0) -> GPT2LMHeadModel:
    """Eval mode: no dropout, so two copies given the same inputs compute the same thing."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=layers, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # GPT-2's init is near-uniform over the vocabulary; sharpen the teacher's
        model.lm_head.weight.mul_(sharpen)
    return model.eval()


def _dataset(num: int, masked: bool, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (num, T + 1), generator=generator)
    rows = []
    for i in range(num):
        labels = tokens[i, 1:].clone()
        if masked:  # a prompt of 3 tokens and some scattered holes get no loss
            labels[:3] = -100
            labels[torch.rand(T, generator=generator) < 0.25] = -100
        rows.append(
            {
                "input_ids": tokens[i, :-1],
                "labels": labels,
                "attention_mask": torch.ones(T, dtype=torch.long),
                "index": torch.tensor(i),
            }
        )
    return rows


def _loader(num: int = 6, masked: bool = False, batch_size: int = 4) -> DataLoader:
    return DataLoader(_dataset(num, masked), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def teacher() -> GPT2LMHeadModel:
    return _gpt2(0, sharpen=12.0)


def _batch(loader: DataLoader) -> dict[str, torch.Tensor]:
    rows = list(loader.dataset)
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def _online_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor, tau: float):
    """Dense KL(p || q) in float64 from softmax and log, not log_softmax: independent of the store's code."""
    p = torch.softmax(teacher_logits.double() / tau, dim=-1)
    q = torch.softmax(student_logits.double() / tau, dim=-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    return (per_token * valid).sum() / valid.sum()


def test_full_k_store_equals_online_dense_kl_value_gradient_and_one_sgd_step(teacher, tmp_path: Path) -> None:
    tau = 2.0
    loader = _loader(masked=True)
    manifest = write_lm_store(
        teacher,
        loader,
        tmp_path / "full",
        mode="topk",
        k=V,
        temperature=tau,
        dtype="float32",
        manifest={"data": DATA},
    )
    store = LMSoftLabelStore(tmp_path / "full", verify=True)
    assert manifest["k"] == V and manifest["vocab_size"] == V and manifest["seq_len"] == T
    assert store.content_hash == manifest["content_hash"] and store.arrays["ids.npy"].dtype == np.uint16
    batch = _batch(loader)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = store.lookup(batch["index"], dtype=torch.float64)
    assert torch.equal(targets.valid, batch["labels"] != -100)
    assert torch.equal(targets.residual, torch.zeros_like(targets.residual))  # k = V: nothing is missing

    student_logits = torch.randn(len(batch["index"]), T, V, dtype=torch.float64, requires_grad=True)
    from_store = sparse_forward_kl(student_logits, targets, temperature=tau)
    (grad_store,) = torch.autograd.grad(from_store, student_logits)
    online = _online_kl(teacher_logits, student_logits, targets.valid, tau)
    (grad_online,) = torch.autograd.grad(online, student_logits)
    assert from_store.item() > 0.05
    assert abs(from_store.item() - online.item()) < 1e-5
    assert torch.allclose(grad_store, grad_online, atol=1e-7, rtol=1e-5)
    renormalized = sparse_forward_kl(student_logits, targets, temperature=tau, missing="renormalize")
    assert abs(renormalized.item() - online.item()) < 1e-5

    # One SGD step of a real student, fed from the store or from the online teacher.
    student = _gpt2(1, layers=1).double()
    twin = copy.deepcopy(student)
    for model, use_store in ((student, True), (twin, False)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if use_store:
            loss = sparse_forward_kl(logits, store.lookup(batch["index"], dtype=torch.float64), temperature=tau)
        else:
            loss = _online_kl(teacher_logits, logits, batch["labels"] != -100, tau)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = max(
        (a - b).abs().max().item() for a, b in zip(student.parameters(), _gpt2(1, layers=1).parameters(), strict=True)
    )
    assert moved > 1e-4
    for (name, a), b in zip(student.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6), name


def test_topk_residual_bucket_and_renormalize_match_the_hand_formulas(teacher, tmp_path: Path) -> None:
    k, tau = 5, 1.0
    loader = _loader(masked=False)
    write_lm_store(teacher, loader, tmp_path / "top5", k=k, dtype="float32", manifest={"data": DATA})
    store = LMSoftLabelStore(tmp_path / "top5")
    batch = _batch(loader)
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=batch["input_ids"]).logits.double() / tau, dim=-1)
    targets = store.lookup(batch["index"], dtype=torch.float64)
    assert bool(targets.valid.all())
    p_top, top_ids = p.topk(k, dim=-1)
    assert torch.equal(targets.ids.sort(-1).values, top_ids.sort(-1).values)
    p_rest = 1.0 - p_top.sum(-1)
    assert 0.01 < p_rest.mean().item() < 0.99  # a real tail
    assert torch.allclose(targets.residual, p_rest, atol=1e-6)

    student_logits = torch.randn(len(batch["index"]), T, V, dtype=torch.float64)
    q = torch.softmax(student_logits / tau, dim=-1)
    q_top = q.gather(-1, top_ids)
    q_rest = 1.0 - q_top.sum(-1)
    by_hand = (p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    assert abs(sparse_forward_kl(student_logits, targets).item() - by_hand.mean().item()) < 1e-6
    p_renorm = p_top / p_top.sum(-1, keepdim=True)
    by_hand_renorm = (p_renorm * (p_renorm / q_top).log()).sum(-1)
    renormalized = sparse_forward_kl(student_logits, targets, missing="renormalize")
    assert abs(renormalized.item() - by_hand_renorm.mean().item()) < 1e-6

    # fp16 log-probs: the same loss to fp16 accuracy, at 4 bytes a slot with uint16 ids.
    write_lm_store(teacher, loader, tmp_path / "top5-fp16", k=k, manifest={"data": DATA})
    half = LMSoftLabelStore(tmp_path / "top5-fp16")
    assert half.arrays["logprobs.npy"].dtype == np.float16
    payload = sum(array.nbytes for array in half.arrays.values()) / (6 * T)
    assert payload == k * (2 + 2) + 1  # uint16 id + fp16 log-prob a slot, + the valid flag
    assert half.bytes_per_token < payload + 3 * 128 / (6 * T) + 1e-9  # + three .npy headers
    loss_half = sparse_forward_kl(student_logits, half.lookup(batch["index"], dtype=torch.float64))
    assert abs(loss_half.item() - by_hand.mean().item()) < 2e-3


def _bernstein_halfwidth(n: int, p: torch.Tensor, failure: float) -> torch.Tensor:
    """Deviation t with P(|count/n - p| > t) <= failure for count ~ Binomial(n, p) (Bernstein)."""
    log_term = math.log(2.0 / failure)
    return ((2 * log_term / 3) + torch.sqrt((2 * log_term / 3) ** 2 + 8 * log_term * n * p * (1 - p))) / (2 * n)


def test_sampled_targets_average_to_the_teacher_distribution_and_are_seeded(teacher, tmp_path: Path) -> None:
    samples, seeds = 128, 40
    loader = _loader(num=2)
    batch = _batch(loader)
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=batch["input_ids"]).logits.double(), dim=-1)
    total = torch.zeros_like(p)
    for seed in range(seeds):
        path = tmp_path / f"sample-{seed}"
        write_lm_store(teacher, loader, path, mode="sample", samples=samples, seed=seed, manifest={"data": DATA})
        targets = LMSoftLabelStore(path).lookup(batch["index"], dtype=torch.float64)
        assert targets.residual is None and targets.ids.shape[-1] == samples
        assert torch.allclose(targets.probs.sum(-1), torch.ones(2, T, dtype=torch.float64))
        nonzero = targets.probs > 0
        assert ((targets.probs * samples).round() == targets.probs * samples).all()
        dense = torch.zeros_like(p).scatter_add_(-1, targets.ids, targets.probs)
        assert ((dense > 0).sum(-1) == nonzero.sum(-1)).all()  # distinct ids, one slot each
        total += dense
    mean = total / seeds
    # Pooled over seeds the frequencies are those of n = seeds * samples draws from p; a bound that fails
    # with probability <= 1e-12 per (position, token), < 1e-7 over all of them: never flakes.
    halfwidth = _bernstein_halfwidth(seeds * samples, p, failure=1e-12)
    assert ((mean - p).abs() <= halfwidth).all()
    assert (halfwidth.max() < 0.1) and p.max(-1).values.mean() > 0.5  # tight enough to mean something
    # ... and it does discriminate: renormalised top-k's expectation (itself) is far outside it.
    p_top, top_ids = p.topk(5, dim=-1)
    topk_target = torch.zeros_like(p).scatter_(-1, top_ids, p_top / p_top.sum(-1, keepdim=True))
    assert ((topk_target - p).abs() > halfwidth).any()

    # Seeded per (seed, sample index): a rewrite is byte-identical, whatever the batching.
    write_lm_store(
        teacher,
        _loader(num=2, batch_size=1),
        tmp_path / "again",
        mode="sample",
        samples=samples,
        seed=3,
        manifest={"data": DATA},
    )
    for name in ("ids.npy", "counts.npy", "valid.npy"):
        assert file_sha256(tmp_path / "again" / name) == file_sha256(tmp_path / "sample-3" / name)
    assert LMSoftLabelStore(tmp_path / "again").content_hash == LMSoftLabelStore(tmp_path / "sample-3").content_hash
    assert LMSoftLabelStore(tmp_path / "sample-4").content_hash != LMSoftLabelStore(tmp_path / "sample-3").content_hash


def test_masked_positions_are_invalid_and_excluded_from_the_loss(teacher, tmp_path: Path) -> None:
    loader = _loader(masked=True)
    for mode in ("topk", "sample"):
        path = tmp_path / mode
        write_lm_store(teacher, loader, path, mode=mode, k=4, samples=8, manifest={"data": DATA})
        store = LMSoftLabelStore(path)
        batch = _batch(loader)
        targets = store.lookup(batch["index"])
        invalid = batch["labels"] == -100
        assert invalid.any() and (~invalid).any()
        assert torch.equal(targets.valid, ~invalid)
        assert (targets.probs[invalid] == 0).all() and (targets.ids[invalid] == 0).all()
        assert int(store.manifest["valid_tokens"]) == int((~invalid).sum())
        student_logits = torch.randn(len(batch["index"]), T, V, requires_grad=True)
        loss = sparse_forward_kl(student_logits, targets)
        (grad,) = torch.autograd.grad(loss, student_logits)
        assert (grad[invalid] == 0).all() and (grad[~invalid] != 0).any()
        scrambled = student_logits.detach().clone()
        scrambled[invalid] = torch.randn_like(scrambled[invalid]) * 10
        assert torch.allclose(sparse_forward_kl(scrambled, targets), loss)
        # A caller's mask narrows further: only the first sample counts.
        first = torch.zeros_like(invalid)
        first[0] = True
        only_first = sparse_forward_kl(student_logits, targets, mask=first)
        alone = sparse_forward_kl(student_logits[:1], store.lookup(batch["index"][:1]))
        assert torch.allclose(only_first, alone)


def test_an_interrupted_write_leaves_no_store(teacher, tmp_path: Path) -> None:
    def breaking_loader():
        loader = _loader()
        for number, batch in enumerate(loader):
            if number == 1:
                raise RuntimeError("killed mid-write")
            yield batch

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_lm_store(teacher, breaking_loader(), tmp_path / "store", num_samples=6, manifest={"data": DATA})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="is not a finished LM soft-label store"):
        LMSoftLabelStore(tmp_path / "store")
    # A loader that stops short (half the split) is refused at finish, and leaves nothing either.
    short = DataLoader(_dataset(6, False)[:4], batch_size=4)
    with pytest.raises(ConfigError, match="got 4 of 6 samples"):
        write_lm_store(teacher, short, tmp_path / "store", num_samples=6)
    assert list(tmp_path.iterdir()) == []


def test_mismatched_vocabulary_length_data_or_index_are_refused_naming_the_store(teacher, tmp_path: Path) -> None:
    path = tmp_path / "store"
    write_lm_store(teacher, _loader(), path, k=4, manifest={"data": DATA, "teacher": {"run": "abc123"}})
    store = LMSoftLabelStore(path)
    store.check_matches(dict(DATA), V, seq_len=T)
    with pytest.raises(ConfigError, match=rf"{path}.*vocabulary size {V}.*is 300"):
        store.check_matches(DATA, 300)
    with pytest.raises(ConfigError, match=rf"{path}.*T={T}.*T=32"):
        store.check_matches(DATA, V, seq_len=32)
    with pytest.raises(ConfigError, match=rf"{path}.*data key 'split'.*'train'.*'validation'"):
        store.check_matches({**DATA, "split": "validation"}, V)
    with pytest.raises(ConfigError, match=rf"{path}.*data key 'tokenizer'"):
        store.check_matches({**DATA, "tokenizer": "bytes"}, V)
    with pytest.raises(ConfigError, match=rf"{path} holds samples 0\.\.5; asked for \[6\]"):
        store.lookup(torch.tensor([0, 6]))
    targets = store.lookup(torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match=rf"{path} has vocabulary size {V}, the student's logits have 300"):
        sparse_forward_kl(torch.randn(2, T, 300), targets)
    with pytest.raises(ConfigError, match=r"temperature 1\.0, the loss asks for 2\.0"):
        sparse_forward_kl(torch.randn(2, T, V), targets, temperature=2.0)
    with pytest.raises(ConfigError, match=r"unknown missing-mass option 'drop' \(valid: residual, renormalize\)"):
        sparse_forward_kl(torch.randn(2, T, V), targets, missing="drop")
    with pytest.raises(ConfigError, match=r"unknown LM store mode 'dense' \(valid: topk, sample\)"):
        write_lm_store(teacher, _loader(), tmp_path / "other", mode="dense")
    assert store.manifest["teacher"] == {"run": "abc123"}
    assert isinstance(targets, SparseTargets) and targets.to("cpu").ids.dtype == torch.long
