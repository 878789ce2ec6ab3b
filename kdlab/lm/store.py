"""The soft-label store for causal LMs: a frozen teacher's next-token distributions, sparse, written once.

A dense store is out of reach for language models (fp16 logits of a 50k vocabulary are ~100 kB a
token), so a store keeps a sparse target per token, in one of two modes:

``topk``
    The k largest log-probs of the teacher at temperature tau and their token ids. The missing
    mass ``p_rest = 1 - sum_i p_i`` is not stored (it follows from the k values) but the loss keeps
    it as a bucket of its own: the student's ``q_rest = 1 - sum_i q_i`` over the same ids, and the KL
    runs over k + 1 buckets. Renormalising the top k instead (``missing="renormalize"``, offered
    for comparison) hands the tail's mass to the head, so the student learns targets scaled up by
    ``1 / sum_i p_i`` and becomes over-confident; the bucket keeps the tail's total mass right
    (not its shape: that is what top-k gives up).
``sample``
    Random-Sampling KD (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs", ACL 2025, arXiv:2503.16870): draw ``samples`` tokens with replacement
    from the teacher's distribution p and keep the distinct ids with their frequencies
    ``count_i / samples``. The authors' poster (github.com/akhilkedia/RandomSamplingKD) states the
    recipe exactly so: sample from the teacher distribution for N rounds, save ``count_i / N``, use
    those as the KL targets (about 12 distinct ids at N = 50). It is importance sampling with the
    proposal q = p, so every weight p_i / q_i is 1: ``E[count_i / N] = p_i`` and the forward-KL
    gradient ``q_student - p_hat`` is unbiased. (A proposal other than p would need the weights
    p_i / q_i, and normalising them makes the estimate biased at finite N; kdlab keeps q = p.)
    Draws are seeded by (seed, sample index) alone, so a rewrite gives the same bytes.

Layout of a store folder (every array memory-mapped, one fixed-size [T] grid per sample)::

    manifest.json   what wrote it (teacher, data, mode, k / samples, temperature, V, T, N, seed),
                    every array's shape, dtype and sha256, and the content hash; written last
    valid.npy       [N, T] bool: the position has a label (label != -100) and a target
    ids.npy         [N, T, k] uint16 (V <= 65536) or int32: token ids (0 on empty slots)
    logprobs.npy    [N, T, k] float16 / float32 (topk): the teacher's log-probs at temperature tau
    counts.npy      [N, T, samples] uint8 / uint16 / int32 (sample): draws of each id (0: empty slot)

Like kdlab/cache.py, a store is written into a hidden temporary folder and renamed into place only
after its manifest is complete: an interrupted write leaves nothing at the path a student reads.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.cache import MANIFEST, open_stored_array, read_manifest, seal_arrays
from kdlab.config import config_hash
from kdlab.errors import ConfigError
from kdlab.files import atomic_write_json, replace_folder

LM_STORE_FORMAT = "kdlab-lm-store/1"
MODES = ("topk", "sample")
MISSING = ("residual", "renormalize")
DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class SparseTargets:
    """The teacher's sparse next-token targets for a batch, aligned with the student's logits.

    ``probs`` is 0 on empty slots and at invalid positions; ``residual`` is the top-k store's
    missing mass (None for a sampled store, whose frequencies already sum to 1)."""

    ids: torch.Tensor  # [B, T, k] long
    probs: torch.Tensor  # [B, T, k] float
    valid: torch.Tensor  # [B, T] bool
    residual: torch.Tensor | None  # [B, T] float, or None
    vocab_size: int | None = None
    temperature: float | None = None
    source: str = "sparse targets"

    def to(self, device: torch.device | str) -> SparseTargets:
        residual = None if self.residual is None else self.residual.to(device)
        return replace(
            self, ids=self.ids.to(device), probs=self.probs.to(device), valid=self.valid.to(device), residual=residual
        )


def _sample_seed(seed: int, index: int) -> int:
    """A generator seed from (store seed, sample index) alone: independent of batching and order."""
    digest = hashlib.sha256(f"kdlab-lm-store:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _index_dtype(vocab_size: int) -> type[np.integer]:
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _count_dtype(samples: int) -> type[np.integer]:
    for dtype in (np.uint8, np.uint16):
        if samples <= np.iinfo(dtype).max:
            return dtype
    return np.int32


def sample_counts(
    log_probs: torch.Tensor, samples: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``samples`` tokens with replacement from each row of ``exp(log_probs)`` [P, V]; return the
    distinct ids (ascending) and their counts, ``[P, min(samples, V)]`` each (empty slots: id 0, count 0).

    Works on the [P, samples] draws only (sorted; a new id opens a slot), never a [P, V] count table."""
    width = min(samples, log_probs.shape[-1])
    rows = log_probs.shape[0]
    ids = torch.zeros(rows, samples, dtype=torch.long, device=log_probs.device)
    counts = torch.zeros_like(ids)
    if rows:
        draws = torch.multinomial(log_probs.float().exp(), samples, replacement=True, generator=generator)
        draws = draws.sort(dim=-1).values
        opens = torch.ones_like(draws, dtype=torch.bool)
        opens[:, 1:] = draws[:, 1:] != draws[:, :-1]
        slot = opens.long().cumsum(-1) - 1
        ids.scatter_(1, slot, draws)
        counts.scatter_add_(1, slot, torch.ones_like(draws))
    return ids[:, :width], counts[:, :width]


class LMStoreWriter:
    """Writes a store sample by sample (by ``index``) into a temporary folder; :meth:`finish` renames it."""

    def __init__(
        self,
        path: str | Path,
        num_samples: int,
        seq_len: int,
        vocab_size: int,
        *,
        mode: str = "topk",
        k: int = 8,
        samples: int = 16,
        temperature: float = 1.0,
        seed: int = 0,
        dtype: str = "float16",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown LM store mode '{mode}' (valid: {', '.join(MODES)})")
        if dtype not in DTYPES:
            raise ConfigError(f"unknown LM store dtype '{dtype}' (valid: {', '.join(DTYPES)})")
        if mode == "topk" and not 1 <= k <= vocab_size:
            raise ConfigError(f"LM store k must be between 1 and the vocabulary size {vocab_size}, got {k}")
        if mode == "sample" and samples < 1:
            raise ConfigError(f"LM store samples must be >= 1, got {samples}")
        if not temperature > 0:
            raise ConfigError(f"LM store temperature must be positive, got {temperature}")
        if num_samples < 1 or seq_len < 1:
            raise ConfigError(f"LM store needs samples and positions, got N={num_samples}, T={seq_len}")
        self.path = Path(path)
        self.num_samples, self.seq_len, self.vocab_size = num_samples, seq_len, vocab_size
        self.mode, self.temperature, self.seed, self.dtype = mode, float(temperature), seed, dtype
        self.k = k if mode == "topk" else None
        self.samples = samples if mode == "sample" else None
        self.width = k if mode == "topk" else min(samples, vocab_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.partial-"))
        grid = (num_samples, seq_len, self.width)
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            "valid.npy": ((num_samples, seq_len), np.bool_),
            "ids.npy": (grid, _index_dtype(vocab_size)),
        }
        if mode == "topk":
            shapes["logprobs.npy"] = (grid, DTYPES[dtype])
        else:
            shapes["counts.npy"] = (grid, _count_dtype(samples))
        open_memmap = np.lib.format.open_memmap
        self.arrays = {name: open_memmap(self.tmp / name, "w+", d, shape) for name, (shape, d) in shapes.items()}
        self.written = np.zeros(num_samples, dtype=bool)

    def write(self, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The teacher's ``logits`` [B, T, V] for the samples at ``index`` [B]; ``labels`` [B, T] pick the
        positions that get a target (label != -100)."""
        batch, seq_len, vocab = logits.shape
        if (seq_len, vocab) != (self.seq_len, self.vocab_size):
            raise ConfigError(
                f"LM store {self.path} is written at T={self.seq_len}, V={self.vocab_size};"
                f" a batch has T={seq_len}, V={vocab}"
            )
        rows = index.detach().cpu().long()
        if rows.numel() != batch or rows.min() < 0 or rows.max() >= self.num_samples:
            raise ConfigError(f"LM store {self.path}: batch index {rows.tolist()} outside 0..{self.num_samples - 1}")
        if self.written[rows.numpy()].any() or rows.unique().numel() != batch:
            raise ConfigError(
                f"LM store {self.path}: sample(s) {sorted(set(rows.tolist()))} written twice; give an ordered loader"
                " without padding or repeats (shuffle=False, no distributed sampler)"
            )
        valid = labels.detach().to(logits.device) != -100
        log_probs = F.log_softmax(logits.detach().float() / self.temperature, dim=-1)
        if self.mode == "topk":
            values, ids = log_probs.topk(self.width, dim=-1)
            values = values.masked_fill(~valid[..., None], 0.0)
            self.arrays["logprobs.npy"][rows.numpy()] = values.cpu().numpy()
        else:
            assert self.samples is not None
            ids = torch.zeros(batch, seq_len, self.width, dtype=torch.long, device=logits.device)
            counts = torch.zeros_like(ids)
            for row, sample in enumerate(rows.tolist()):
                generator = torch.Generator(device=logits.device).manual_seed(_sample_seed(self.seed, sample))
                keep = valid[row]
                ids[row, keep], counts[row, keep] = sample_counts(log_probs[row, keep], self.samples, generator)
            self.arrays["counts.npy"][rows.numpy()] = counts.cpu().numpy()
        ids = ids.masked_fill(~valid[..., None], 0)
        self.arrays["ids.npy"][rows.numpy()] = ids.cpu().numpy()
        self.arrays["valid.npy"][rows.numpy()] = valid.cpu().numpy()
        self.written[rows.numpy()] = True

    def finish(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Flush, hash, write the manifest last and move the folder to its path (replacing an old store)."""
        if not self.written.all():
            missing = np.flatnonzero(~self.written)
            raise ConfigError(
                f"LM store {self.path} got {int(self.written.sum())} of {self.num_samples} samples"
                f" (first missing index {int(missing[0])}); give the whole training split"
            )
        files = seal_arrays(self.tmp, self.arrays)
        valid_tokens = int(np.count_nonzero(self.arrays["valid.npy"]))
        self.arrays.clear()
        full = {
            **manifest,
            "format": LM_STORE_FORMAT,
            "mode": self.mode,
            "k": self.k,
            "samples": self.samples,
            "temperature": self.temperature,
            "seed": self.seed,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "dtype": self.dtype if self.mode == "topk" else None,
            "valid_tokens": valid_tokens,
            "files": files,
            "content_hash": config_hash({name: info["sha256"] for name, info in files.items()}),
        }
        atomic_write_json(self.tmp / MANIFEST, full)
        replace_folder(self.tmp, self.path)
        return full

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def describe_teacher(teacher: torch.nn.Module) -> dict[str, Any]:
    """What a manifest says about a teacher when the caller gives nothing better (a run hash, a path)."""
    config = getattr(teacher, "config", None)
    return {
        "class": type(teacher).__name__,
        "name_or_path": getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None),
        "parameters": sum(p.numel() for p in teacher.parameters()),
    }


@torch.no_grad()
def write_lm_store(
    teacher: torch.nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    path: str | Path,
    *,
    mode: str = "topk",
    k: int = 8,
    samples: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: str = "float16",
    manifest: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """Run the frozen ``teacher`` (eval, no grad) over the training split and write its sparse targets at
    ``path``; returns the manifest. ``manifest`` adds the caller's fields: ``teacher`` (what it is; a
    default is derived from the model) and ``data`` (the data description a reader checks against).

    ``dataloader`` gives batches ``{input_ids, labels, attention_mask, index}`` covering every sample
    once (an ordered loader; rows land at ``index``, so order only matters for throughput).
    ``num_samples`` defaults to ``len(dataloader.dataset)``. Any failure leaves no store and no
    temporary folder."""
    if num_samples is None:
        dataset = getattr(dataloader, "dataset", None)
        if dataset is None:
            raise ConfigError("write_lm_store needs num_samples when the loader has no dataset")
        num_samples = len(dataset)
    fields = dict(manifest or {})
    fields.setdefault("teacher", describe_teacher(teacher))
    fields.setdefault("data", None)
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    writer: LMStoreWriter | None = None
    started = time.perf_counter()
    try:
        for batch in dataloader:
            input_ids = batch["input_ids"].to(device)
            logits = teacher(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
            if writer is None:
                writer = LMStoreWriter(
                    path,
                    num_samples,
                    logits.shape[1],
                    logits.shape[2],
                    mode=mode,
                    k=k,
                    samples=samples,
                    temperature=temperature,
                    seed=seed,
                    dtype=dtype,
                )
            writer.write(batch["index"], logits, batch["labels"])
        if writer is None:
            raise ConfigError(f"LM store {path}: the loader gave no batches")
        fields["write_seconds"] = round(time.perf_counter() - started, 3)
        return writer.finish(fields)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        teacher.train(was_training)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, Mapping):
        return {prefix or "data": data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class LMSoftLabelStore:
    """A finished LM store, opened read-only and memory-mapped.

    Opening checks every array's shape and dtype against the manifest; ``verify=True`` also re-hashes
    the files (a full read: minutes for a store of billions of tokens, so not the default)."""

    def __init__(self, path: str | Path, verify: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, LM_STORE_FORMAT, "LM soft-label store", "with `kdlab run`")
        self.mode: str = self.manifest["mode"]
        self.num_samples: int = self.manifest["num_samples"]
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.temperature: float = self.manifest["temperature"]
        self.arrays = {
            name: open_stored_array(self.path, name, info, verify, kind="LM soft-label store")
            for name, info in self.manifest["files"].items()
        }

    @property
    def content_hash(self) -> str:
        """Identifies the stored numbers (a student run's spec can name the store by it)."""
        return self.manifest["content_hash"]

    @property
    def bytes_per_token(self) -> float:
        """Disk bytes per token position (valid or not) of the [N, T] grid."""
        size = sum((self.path / name).stat().st_size for name in self.manifest["files"])
        return size / (self.num_samples * self.seq_len)

    def check_matches(
        self, data_description: Mapping[str, Any] | None, vocab_size: int, seq_len: int | None = None
    ) -> None:
        """Refuse a store written for other data, another vocabulary or another block length."""
        if vocab_size != self.vocab_size:
            raise ConfigError(
                f"LM soft-label store {self.path} was written at vocabulary size {self.vocab_size},"
                f" the student's is {vocab_size}"
            )
        if seq_len is not None and seq_len != self.seq_len:
            raise ConfigError(
                f"LM soft-label store {self.path} was written at sequence length T={self.seq_len},"
                f" the student's batches have T={seq_len}"
            )
        stored, given = _flatten(self.manifest.get("data")), _flatten(data_description)
        for key in sorted(set(stored) | set(given)):
            if stored.get(key, "<absent>") != given.get(key, "<absent>"):
                raise ConfigError(
                    f"LM soft-label store {self.path} was written for other data: data key '{key}' is"
                    f" {stored.get(key, '<absent>')!r} in the store, {given.get(key, '<absent>')!r} here"
                )

    def lookup(
        self, index: torch.Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> SparseTargets:
        """The sparse targets of the training samples at ``index`` [B]."""
        rows = index.detach().cpu().long()
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.num_samples):
            bad = rows[(rows < 0) | (rows >= self.num_samples)].tolist()
            raise ConfigError(
                f"LM soft-label store {self.path} holds samples 0..{self.num_samples - 1}; asked for {bad}"
            )
        picked = rows.numpy()
        valid = torch.from_numpy(np.asarray(self.arrays["valid.npy"][picked]))
        ids = torch.from_numpy(np.asarray(self.arrays["ids.npy"][picked]).astype(np.int64))
        residual: torch.Tensor | None
        if self.mode == "topk":
            logprobs = torch.from_numpy(np.asarray(self.arrays["logprobs.npy"][picked], dtype=np.float64))
            probs = logprobs.exp() * valid[..., None]
            if self.manifest["k"] >= self.vocab_size:
                residual = torch.zeros(valid.shape, dtype=dtype)
            else:
                # fp16 log-probs round each p_i by up to ~p_i |log p_i| 2**-11; never below 0.
                residual = (1.0 - probs.sum(-1)).clamp_min(0.0).mul(valid).to(dtype)
        else:
            counts = torch.from_numpy(np.asarray(self.arrays["counts.npy"][picked]).astype(np.float64))
            probs = counts / self.manifest["samples"] * valid[..., None]
            residual = None
        targets = SparseTargets(
            ids=ids,
            probs=probs.to(dtype),
            valid=valid,
            residual=residual,
            vocab_size=self.vocab_size,
            temperature=self.temperature,
            source=f"LM soft-label store {self.path}",
        )
        return targets if device is None else targets.to(device)


def sparse_forward_kl(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    missing: str = "residual",
) -> torch.Tensor:
    """Forward KL(p || q) between the stored sparse targets and the student at ``temperature``, averaged
    over the valid (and ``mask``-ed in) tokens: ``sum_i p_i (log p_i - log q_i)`` over the stored
    buckets, plus the residual bucket ``p_rest (log p_rest - log q_rest)`` of a top-k store when
    ``missing="residual"``. The ``p log p`` terms do not move the gradient; they make the value a KL.

    ``missing="renormalize"`` scales the top-k targets to sum to 1 (vanilla top-k KD, biased: see the
    module docstring). A sampled store's frequencies already sum to 1, so ``missing`` does not apply.
    No tau**2 factor: multiply outside if the recipe wants Hinton's scaling.

    It materialises ``log_softmax`` of the [B, T, V] logits (and, for the residual, one masked copy
    for ``log q_rest``): the same as dense KD, fine at kdlab's scale; a chunked version would need
    only logsumexp per token."""
    if missing not in MISSING:
        raise ConfigError(f"unknown missing-mass option '{missing}' (valid: {', '.join(MISSING)})")
    batch, seq_len, vocab = student_logits.shape
    if targets.vocab_size is not None and vocab != targets.vocab_size:
        raise ConfigError(
            f"{targets.source} has vocabulary size {targets.vocab_size}, the student's logits have {vocab}"
        )
    if tuple(targets.valid.shape) != (batch, seq_len):
        raise ConfigError(
            f"{targets.source} gives targets for [B, T] = {list(targets.valid.shape)}, the student's logits are"
            f" [{batch}, {seq_len}]"
        )
    if targets.temperature is not None and not math.isclose(targets.temperature, temperature):
        raise ConfigError(
            f"{targets.source} was written at temperature {targets.temperature}, the loss asks for {temperature}"
        )
    keep = targets.valid if mask is None else targets.valid & mask.bool()
    count = keep.sum()
    if count == 0:
        return student_logits.sum() * 0.0
    # float32 at least: bf16/fp16 logits under autocast would round log q to 3 significant digits.
    scaled = (student_logits if student_logits.dtype == torch.float64 else student_logits.float()) / temperature
    log_q = F.log_softmax(scaled, dim=-1).gather(-1, targets.ids)
    p = targets.probs.to(log_q.dtype)
    if missing == "renormalize" and targets.residual is not None:
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    per_token = (torch.special.xlogy(p, p) - p * log_q).sum(-1)
    if missing == "residual" and targets.residual is not None and targets.ids.shape[-1] < vocab:
        # log q_rest from the logits outside the k ids: exact even where 1 - sum q_i cancels to 0.
        log_q_rest = scaled.scatter(-1, targets.ids, -math.inf).logsumexp(-1) - scaled.logsumexp(-1)
        p_rest = targets.residual.to(log_q.dtype)
        per_token = per_token + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
    return (per_token * keep).sum() / count
