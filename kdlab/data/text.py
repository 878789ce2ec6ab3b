"""Text data for causal-LM distillation, with nothing to download: a byte corpus cut into blocks
(language modelling) and prompt/response pairs (SFT, sequence-level KD, on-policy KD).

Sources (:func:`create_text_datamodule`):

* ``stdlib``: the running Python's own standard-library ``*.py`` files (every machine has them);
* ``folder``: the text files of a local folder (``patterns``, default :data:`DEFAULT_PATTERNS`);
* ``jsonl``: ``{"prompt": str, "response": str}`` lines;
* ``stdlib-functions``: pairs made from the standard library, prompt = a function's ``def`` line(s)
  and docstring, response = the next ``response_bytes`` bytes of its body.

Every batch is a dict (the LM systems code against exactly this):

* ``input_ids`` LongTensor [B, T];
* ``labels`` LongTensor [B, T]: the next-token target of each position (already shifted: the loss
  is ``cross_entropy(logits[:, t], labels[:, t])``), -100 where there is no loss (prompt, padding);
* ``attention_mask`` LongTensor [B, T], 1 on real tokens (padding is on the right);
* ``index`` LongTensor [B]: the sample's position in its split (a soft-label store keys on it);
* pairs only: ``prompt_ids`` [B, P], the (truncated) prompts LEFT-padded with the pad id for
  generation, and ``prompt_attention_mask`` [B, P].

Splits are made by hashing names (a file's relative path, a pair's prompt), never by a random
draw, so the same files give the same split on every machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlab.data.base import EpochShuffle, RankShard, ShardedSequence
from kdlab.data.byte_tokens import BYTE_OFFSET, byte_tokenizer, eos_id_of, is_byte_tokenizer, pad_id_of
from kdlab.data.text_corpus import SPLITS, BlockDataset, TextCorpus
from kdlab.data.text_pairs import (
    PairDataset,
    SampleDataset,
    corpus_function_pairs,
    jsonl_files,
    read_jsonl,
    split_pairs,
)
from kdlab.errors import ConfigError, did_you_mean

SOURCES = ("stdlib", "folder", "jsonl", "stdlib-functions")


# ------------------------------------------------------------------------------------------ data module


class TextDataModule(L.LightningDataModule):
    """Train and validation splits of text with the batch contract of this module's docstring.

    There is no separate test split: ``test_dataloader`` serves the validation split (held-out
    files or pairs), so a run's "test" numbers are its held-out numbers. Splits are built on first
    use (``build`` returns ``(train dataset, validation dataset, provenance dict)``).
    """

    def __init__(
        self,
        build: Callable[[], tuple[Dataset, Dataset, dict[str, Any]]],
        *,
        tokenizer: Any,
        source: str,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1 or block_size < 1:
            raise ConfigError(
                f"batch sizes and block_size must be positive, got {batch_size}, {eval_batch_size}, {block_size}"
            )
        self.build = build
        self.tokenizer = tokenizer
        self.source = source
        self.block_size = block_size
        self.max_length = max_length or block_size
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Any = None
        self.val_set: Any = None
        self.provenance: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.provenance = self.build()
            if len(self.train_set) == 0 or len(self.val_set) == 0:
                raise ConfigError(
                    f"text source '{self.source}' gives {len(self.train_set)} train and {len(self.val_set)} validation "
                    f"samples at block_size={self.block_size}; raise the byte caps or lower block_size"
                )

    # -- what systems read ------------------------------------------------------------------------

    @property
    def has_validation(self) -> bool:
        return True

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # ``tokenizer.vocab_size`` leaves out added tokens (ByT5: 256 < 259)

    @property
    def pad_token_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return eos_id_of(self.tokenizer)

    @property
    def num_train_samples(self) -> int:
        self.setup()
        return len(self.train_set)

    @property
    def num_val_samples(self) -> int:
        self.setup()
        return len(self.val_set)

    @property
    def num_val_tokens(self) -> int:
        """Validation positions with a loss (``labels != -100``): the denominator of its mean loss."""
        self.setup()
        return len(self.val_set.target_ids())

    @functools.cached_property
    def val_bytes_per_token(self) -> float:
        """UTF-8 bytes of the validation targets per target token, so bits per byte =
        ``mean target loss in nats / ln 2 / val_bytes_per_token``.

        The bytes are the text the targets stand for: with the byte tokenizer, the number of byte
        targets (ids >= 3; eos and other specials count 0 bytes but are tokens), so exactly 1.0
        when no target is special and slightly less with eos targets (file separators, response
        ends); with another tokenizer, each sample's targets decoded with ``skip_special_tokens``
        and encoded as UTF-8 (a word cut at a block's start may lose a leading space).
        """
        self.setup()
        tokens = self.num_val_tokens
        if is_byte_tokenizer(self.tokenizer):
            text_bytes = int((self.val_set.target_ids() >= BYTE_OFFSET).sum())
        else:
            text_bytes = sum(
                len(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
                for ids in self.val_set.targets()
            )
        return text_bytes / tokens

    def describe(self) -> dict[str, Any]:
        """Everything a run records about its text data: source, tokenizer, sizes, provenance."""
        self.setup()
        return {
            "source": self.source,
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "block_size": self.block_size,
            "max_length": self.max_length,
            "train_samples": self.num_train_samples,
            "val_samples": self.num_val_samples,
            "val_tokens": self.num_val_tokens,
            "val_bytes_per_token": self.val_bytes_per_token,
            **self.provenance,
        }

    # The soft-label store asks these of every data module: text samples never change per epoch.
    deterministic_training_view = True

    def training_view_signature(self) -> str:
        self.setup()
        return f"{type(self).__name__}(source={self.source}, train={len(self.train_set)}, max_length={self.max_length})"

    def use_augmentation(self, augment: bool | None) -> None:
        """No-op: text is never augmented (the trainer calls this on every data module)."""

    # -- loaders ---------------------------------------------------------------------------------

    def rank_shard(self) -> RankShard:
        """This process's share of the data while a trainer is attached (the trainer is told not
        to add samplers of its own); everything outside training sees whole splits."""
        trainer = self.trainer
        return RankShard(trainer.global_rank, trainer.world_size) if trainer is not None else RankShard()

    def _loader(self, dataset: Any, batch_size: int, sampler: Sampler[int] | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=dataset.collate,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``(seed, epoch)``; ``batch_size`` is the global batch, each rank loads its share."""
        self.setup()
        shard = self.rank_shard()
        if self.batch_size % shard.world:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly "
                f"over {shard.world} processes"
            )
        sampler = EpochShuffle(len(self.train_set), self.seed, shard.rank, shard.world)
        return self._loader(self.train_set, self.batch_size // shard.world, sampler)

    def _eval_loader(self, dataset: Any) -> DataLoader:
        shard = self.rank_shard()
        sampler = ShardedSequence(len(dataset), shard) if shard.world > 1 else None
        return self._loader(dataset, self.eval_batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The validation split (text sources have no separate test split)."""
        return self.val_dataloader()

    def ordered_train_dataloader(self) -> DataLoader:
        """The training split in index order, unsharded (a soft-label store's writer)."""
        self.setup()
        return self._loader(self.train_set, self.eval_batch_size)

    def train_prompts(self) -> list[str]:
        """The prompts of a pairs training split, in index order (what a teacher generates from)."""
        self.setup()
        if not isinstance(self.train_set, PairDataset):
            raise ConfigError(f"text source '{self.source}' has no prompts; use 'jsonl' or 'stdlib-functions'")
        return [prompt for prompt, _ in self.train_set.pairs]

    def use_generated_training_set(self, samples: dict[str, torch.Tensor]) -> None:
        """Train on ready-made rows instead (:class:`SampleDataset`; e.g. the teacher's sampled
        continuations of the ordered training split, for sequence-level KD); validation stays.
        Changes this module: call it on a copy to keep the original."""
        self.setup()
        self.train_set = SampleDataset(samples)

    def with_train_pairs(self, pairs: Sequence[tuple[str, str]]) -> TextDataModule:
        """A new module whose training split is ``pairs`` (e.g. a teacher's generations, for
        sequence-level KD), with this one's validation split, tokenizer and settings."""
        self.setup()
        val_set, provenance = self.val_set, self.provenance
        pairs = list(pairs)

        def build() -> tuple[Dataset, Dataset, dict[str, Any]]:
            train = PairDataset(pairs, self.tokenizer, self.max_length, self.max_prompt_length)
            return train, val_set, {**provenance, "train": {"pairs": len(pairs), "replaced": "with_train_pairs"}}

        return TextDataModule(
            build,
            tokenizer=self.tokenizer,
            source=self.source,
            block_size=self.block_size,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            max_length=self.max_length,
            max_prompt_length=self.max_prompt_length,
        )


# ----------------------------------------------------------------------------------------------- build

_CORPUS_OPTIONS = ("val_fraction", "max_train_bytes", "max_val_bytes")
_PAIR_OPTIONS = ("max_length", "max_prompt_length")
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "stdlib": _CORPUS_OPTIONS,
    "folder": (*_CORPUS_OPTIONS, "patterns"),
    "jsonl": ("val_path", "val_fraction", *_PAIR_OPTIONS),
    "stdlib-functions": (*_CORPUS_OPTIONS, "response_bytes", *_PAIR_OPTIONS),
}


def _corpus_blocks(corpus: TextCorpus, tokenizer: Any, block_size: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    train = BlockDataset(corpus.tokens("train", tokenizer), block_size)
    validation = BlockDataset(corpus.tokens("validation", tokenizer), block_size)
    return train, validation, {"corpus": corpus.describe()}


def _corpus_pairs(
    corpus: TextCorpus, tokenizer: Any, response_bytes: int, max_length: int, max_prompt_length: int | None
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    splits = {split: corpus_function_pairs(corpus, split, response_bytes) for split in SPLITS}
    info = corpus.describe()
    for split in SPLITS:
        info[split]["pairs"] = len(splits[split])
    return (
        PairDataset(splits["train"], tokenizer, max_length, max_prompt_length),
        PairDataset(splits["validation"], tokenizer, max_length, max_prompt_length),
        {"corpus": info, "response_bytes": response_bytes},
    )


def _given_pairs(
    train: list[tuple[str, str]],
    validation: list[tuple[str, str]],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None,
    provenance: dict[str, Any],
) -> tuple[Dataset, Dataset, dict[str, Any]]:
    return (
        PairDataset(train, tokenizer, max_length, max_prompt_length),
        PairDataset(validation, tokenizer, max_length, max_prompt_length),
        {**provenance, "train": {"pairs": len(train)}, "validation": {"pairs": len(validation)}},
    )


def pairs_datamodule(
    pairs: Sequence[tuple[str, str]],
    val_pairs: Sequence[tuple[str, str]] | None = None,
    *,
    tokenizer: Any = None,
    val_fraction: float = 0.05,
    block_size: int = 128,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    source: str = "pairs",
    provenance: dict[str, Any] | None = None,
    **loader_options: Any,
) -> TextDataModule:
    """A module from in-memory ``(prompt, response)`` pairs; without ``val_pairs`` the pairs are
    split by :func:`split_pairs`. ``loader_options``: batch_size, eval_batch_size, seed, num_workers."""
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    if val_pairs is None:
        train, validation = split_pairs(list(pairs), val_fraction)
    else:
        train, validation = list(pairs), list(val_pairs)
    max_length = max_length or block_size
    build = functools.partial(
        _given_pairs, train, validation, tokenizer, max_length, max_prompt_length, provenance or {}
    )
    return TextDataModule(
        build,
        tokenizer=tokenizer,
        source=source,
        block_size=block_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        **loader_options,
    )


def create_text_datamodule(
    source: str,
    *,
    tokenizer: Any = None,
    path: str | Path | Sequence[str | Path] | None = None,
    block_size: int = 128,
    batch_size: int = 32,
    eval_batch_size: int = 64,
    seed: int = 0,
    num_workers: int = 0,
    **options: Any,
) -> TextDataModule:
    """Build the text data module of ``source`` (one of :data:`SOURCES`); ``tokenizer`` defaults
    to :func:`byte_tokenizer`, ``path`` is the folder (``folder``) or JSONL file(s) (``jsonl``).
    Options per source are :data:`SOURCE_OPTIONS`. Files are listed (and JSONL read) now, so a
    missing path fails before training; tokenising waits for ``setup``."""
    if source not in SOURCES:
        hint = did_you_mean(source, SOURCES)
        raise ConfigError(f"unknown text source '{source}'{'; ' + hint if hint else ''} (valid: {', '.join(SOURCES)})")
    unknown_options = sorted(set(options) - set(SOURCE_OPTIONS[source]))
    if unknown_options:
        raise ConfigError(
            f"text source '{source}' has no option {', '.join(unknown_options)} "
            f"(valid: {', '.join(SOURCE_OPTIONS[source])})"
        )
    if source in ("stdlib", "stdlib-functions") and path is not None:
        raise ConfigError(f"text source '{source}' reads the standard library; it takes no path (got {path})")
    if path is None and source in ("folder", "jsonl"):
        raise ConfigError(f"text source '{source}' needs a path")
    tokenizer = tokenizer if tokenizer is not None else byte_tokenizer()
    loader_options = {"batch_size": batch_size, "eval_batch_size": eval_batch_size, "seed": seed}
    loader_options["num_workers"] = num_workers
    max_length = options.pop("max_length", None) or block_size
    max_prompt_length = options.pop("max_prompt_length", None)
    if source == "jsonl":
        files = jsonl_files(path)  # type: ignore[arg-type]
        pairs = [pair for file in files for pair in read_jsonl(file)]
        val_path = options.pop("val_path", None)
        val_pairs = None
        if val_path is not None:
            val_pairs = [pair for file in jsonl_files(val_path) for pair in read_jsonl(file)]
        provenance = {
            "files": [str(f) for f in files],
            "val_files": val_path and [str(f) for f in jsonl_files(val_path)],
        }
        return pairs_datamodule(
            pairs,
            val_pairs,
            tokenizer=tokenizer,
            block_size=block_size,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            source=source,
            provenance=provenance,
            **options,
            **loader_options,
        )
    response_bytes = options.pop("response_bytes", 256)
    corpus = TextCorpus(os.fspath(path), **options) if source == "folder" else TextCorpus.stdlib(**options)  # type: ignore[arg-type]
    if source == "stdlib-functions":
        build = functools.partial(_corpus_pairs, corpus, tokenizer, response_bytes, max_length, max_prompt_length)
    else:
        build = functools.partial(_corpus_blocks, corpus, tokenizer, block_size)
    return TextDataModule(
        build,
        tokenizer=tokenizer,
        source=source,
        block_size=block_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        **loader_options,
    )
