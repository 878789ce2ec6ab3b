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
import hashlib
import json
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdlab.data.base import EpochShuffle, RankShard, ShardedSequence
from kdlab.errors import ConfigError, DataNotFoundError, did_you_mean
from kdlab.files import atomic_write_text

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3 in the byte tokenizer
BYTE_VOCAB_SIZE = 259
IGNORE_INDEX = -100
SOURCES = ("stdlib", "folder", "jsonl", "stdlib-functions")
DEFAULT_PATTERNS = ("**/*.txt", "**/*.md", "**/*.rst", "**/*.py")
# Left out of the stdlib corpus: installed third-party code (differs per machine), the test suites
# (huge, repetitive, partly deliberately broken files) and IDLE; caches hold no sources.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
SPLITS = ("train", "validation")


# --------------------------------------------------------------------------------------------- tokens


def byte_tokenizer() -> Any:
    """The byte-level tokenizer (pure Python, nothing to download): pad 0, eos 1, unk 2, byte b -> b + 3."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def encode_bytes(data: bytes) -> torch.Tensor:
    """The byte tokenizer's ids of ``data`` (no eos), vectorised: tokenising the stdlib takes
    milliseconds instead of the tokenizer's per-character Python loop."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET)


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` maps byte b to b + 3 (so :func:`encode_bytes` may replace it)."""
    return (
        type(tokenizer).__name__ == "ByT5Tokenizer"
        and getattr(tokenizer, "offset", None) == BYTE_OFFSET
        and tokenizer.pad_token_id == PAD_ID
        and tokenizer.eos_token_id == EOS_ID
    )


def encode_text(text: str, tokenizer: Any) -> torch.Tensor:
    """``text``'s ids without special tokens, as a 1-D LongTensor."""
    if is_byte_tokenizer(tokenizer):
        return encode_bytes(text.encode("utf-8"))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos token; text data ends sequences with it")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (GPT-2-style tokenizers have no pad token)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (sha1): the same split on every machine."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------- corpus


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a glob pattern over ``/``-separated relative paths: ``**/`` matches any number
    of folders (none included), ``*`` and ``?`` stay inside one name, ``[...]`` is a class."""
    regex = ""
    for i, segment in enumerate(pattern.split("/")):
        if segment == "**":
            regex += "(?:[^/]+/)*"
            continue
        j = 0
        while j < len(segment):
            char = segment[j]
            end = segment.find("]", j + 1)
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            elif char == "[" and end > j + 1:
                regex += "[" + segment[j + 1 : end].replace("!", "^", 1) + "]"
                j = end
            else:
                regex += re.escape(char)
            j += 1
        regex += "/" if i < pattern.count("/") else ""
    return re.compile(regex)


class TextCorpus:
    """The text files of a folder, split by file into train / validation by a hash of each file's
    relative path (:func:`hash_fraction` below ``val_fraction``: validation; at least one file).

    Each split is its files in hash order, separated by the eos id. A cap ``max_<split>_bytes``
    counts the files' bytes plus one per separator (= tokens with the byte tokenizer); files are
    taken until it is reached and the last one taken is cut to fit, so a capped split is a
    deterministic, roughly random sample of whole files.
    """

    def __init__(
        self,
        root: str | Path,
        patterns: str | Sequence[str] = DEFAULT_PATTERNS,
        *,
        val_fraction: float = 0.05,
        max_train_bytes: int | None = None,
        max_val_bytes: int | None = None,
        excluded_dirs: Iterable[str] = (),
        kind: str = "folder",
    ) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, cap in (("max_train_bytes", max_train_bytes), ("max_val_bytes", max_val_bytes)):
            if cap is not None and cap < 1:
                raise ConfigError(f"{name} must be a positive number of bytes or None, got {cap}")
        self.root = Path(root).expanduser()
        self.patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        self.val_fraction = val_fraction
        self.caps = {"train": max_train_bytes, "validation": max_val_bytes}
        self.excluded_dirs = frozenset(excluded_dirs)
        self.kind = kind
        if not self.root.is_dir():
            raise DataNotFoundError(f"text folder {self.root} does not exist (patterns {', '.join(self.patterns)})")
        self.files = self._list_files()
        if len(self.files) < 2:
            raise DataNotFoundError(
                f"text folder {self.root} has {len(self.files)} files matching {', '.join(self.patterns)}; "
                "the split by file needs at least 2"
            )
        fractions = {name: hash_fraction(name) for name in self.files}
        ordered = sorted(self.files, key=lambda name: (fractions[name], name))
        validation = [name for name in ordered if fractions[name] < val_fraction] or ordered[:1]
        chosen = set(validation)
        self.split_files = {"train": [name for name in ordered if name not in chosen], "validation": validation}
        self._stats: dict[str, dict[str, int]] = {}

    @classmethod
    def stdlib(cls, **options: Any) -> TextCorpus:
        """The running Python's standard-library sources (``*.py`` outside :data:`STDLIB_EXCLUDED_DIRS`)."""
        return cls(
            sysconfig.get_paths()["stdlib"], "**/*.py", excluded_dirs=STDLIB_EXCLUDED_DIRS, kind="stdlib", **options
        )

    def _list_files(self) -> list[str]:
        """Relative paths matching a pattern, never descending into an excluded folder."""
        matchers = [_glob_regex(pattern) for pattern in self.patterns]
        found = []
        for folder, subfolders, names in os.walk(self.root):
            subfolders[:] = [name for name in subfolders if name not in self.excluded_dirs]
            prefix = Path(folder).relative_to(self.root).as_posix()
            for name in names:
                relative = name if prefix == "." else f"{prefix}/{name}"
                if any(matcher.fullmatch(relative) for matcher in matchers):
                    found.append(relative)
        return sorted(found)

    def read(self, split: str) -> list[tuple[str, bytes]]:
        """``(relative path, contents)`` of the split's files in hash order, within its cap."""
        cap = self.caps[split]
        taken: list[tuple[str, bytes]] = []
        total = -1  # the first file has no separator before it
        for name in self.split_files[split]:
            if cap is not None and total + 1 >= cap:
                break
            data = (self.root / name).read_bytes()
            if cap is not None:
                data = data[: cap - total - 1]
            taken.append((name, data))
            total += 1 + len(data)
        self._stats[split] = {"files": len(taken), "bytes": sum(len(data) for _, data in taken)}
        return taken

    def tokens(self, split: str, tokenizer: Any) -> torch.Tensor:
        """The split as one 1-D LongTensor: its files' tokens joined by the eos id."""
        files = self.read(split)
        eos = _eos_id(tokenizer)
        if is_byte_tokenizer(tokenizer):
            stream = encode_bytes(b"\0".join(data for _, data in files))
            lengths = torch.tensor([len(data) for _, data in files[:-1]], dtype=torch.long)
            stream[torch.cumsum(lengths + 1, 0) - 1] = eos
        else:
            parts = []
            for i, (_, data) in enumerate(files):
                if i:
                    parts.append(torch.tensor([eos]))
                parts.append(encode_text(data.decode("utf-8", errors="replace"), tokenizer))
            stream = torch.cat(parts)
        self._stats[split]["tokens"] = len(stream)
        return stream

    def describe(self) -> dict[str, Any]:
        """Where the text came from and how much of it each split holds (after :meth:`tokens`)."""
        info: dict[str, Any] = {
            "kind": self.kind,
            "root": str(self.root),
            "patterns": list(self.patterns),
            "files_found": len(self.files),
            "val_fraction": self.val_fraction,
            "split": "by sha1 of the relative path",
            "max_train_bytes": self.caps["train"],
            "max_val_bytes": self.caps["validation"],
            **{split: dict(self._stats.get(split, {})) for split in SPLITS},
        }
        if self.kind == "stdlib":
            info["excluded_dirs"] = sorted(self.excluded_dirs)
            info["python_version"] = platform.python_version()
        return info


class BlockDataset(Dataset):
    """A token stream cut into non-overlapping blocks of ``block_size + 1`` tokens (the remainder
    is dropped): sample i is ``input_ids = block[:-1]``, ``labels = block[1:]``."""

    collate = None  # the default collation stacks the equal-length samples

    def __init__(self, tokens: torch.Tensor, block_size: int) -> None:
        n = len(tokens) // (block_size + 1)
        self.blocks = tokens[: n * (block_size + 1)].view(n, block_size + 1)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]
        return {
            "input_ids": block[:-1],
            "labels": block[1:],
            "attention_mask": torch.ones(self.block_size, dtype=torch.long),
            "index": index,
        }

    def targets(self) -> Iterable[torch.Tensor]:
        return iter(self.blocks[:, 1:])

    def target_ids(self) -> torch.Tensor:
        return self.blocks[:, 1:].reshape(-1)


# ----------------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PairExample:
    """One tokenised pair: ``sequence`` = kept prompt + kept response (+ eos), ``prompt`` its first
    ``len(prompt)`` tokens."""

    prompt: torch.Tensor
    sequence: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        labels = self.sequence[1:].clone()
        labels[: max(len(self.prompt) - 1, 0)] = IGNORE_INDEX
        return labels


def tokenize_pair(
    prompt: str, response: str, tokenizer: Any, max_length: int, max_prompt_length: int | None = None
) -> PairExample:
    """Tokenise a pair for a model that sees at most ``max_length`` tokens (so ``prompt + response
    + eos`` keeps ``max_length + 1``). Too long: the prompt keeps its last tokens, at most
    ``max_prompt_length`` (default ``max_length // 2``) unless the response leaves it more room;
    then the response (with its eos) is cut, losing the eos, since the response did not end there."""
    return _PairTokenizer(tokenizer, max_length, max_prompt_length)(prompt, response)


class _PairTokenizer:
    """:func:`tokenize_pair` with the tokenizer inspected once (its attribute lookups are slow)."""

    def __init__(self, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> None:
        self.tokenizer = tokenizer
        self.byte_level = is_byte_tokenizer(tokenizer)
        self.eos = torch.tensor([_eos_id(tokenizer)])
        self.max_length = max_length
        self.max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length

    def encode(self, text: str) -> torch.Tensor:
        return encode_bytes(text.encode("utf-8")) if self.byte_level else encode_text(text, self.tokenizer)

    def __call__(self, prompt: str, response: str) -> PairExample:
        prompt_ids = self.encode(prompt)
        target_ids = torch.cat([self.encode(response), self.eos])
        budget = self.max_length + 1
        keep = min(len(prompt_ids), max(self.max_prompt_length, budget - len(target_ids)), self.max_length)
        prompt_ids = prompt_ids[len(prompt_ids) - keep :]
        return PairExample(prompt_ids, torch.cat([prompt_ids, target_ids[: budget - keep]]))


class PairCollator:
    """Right-pads sequences (pad id, mask 0, label -100) and left-pads prompts (for generation)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[tuple[PairExample, int]]) -> dict[str, torch.Tensor]:
        size = len(items)
        width = max(len(example.sequence) - 1 for example, _ in items)
        prompt_width = max(len(example.prompt) for example, _ in items)
        batch = {
            "input_ids": torch.full((size, width), self.pad_id, dtype=torch.long),
            "labels": torch.full((size, width), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((size, width), dtype=torch.long),
            "index": torch.tensor([index for _, index in items], dtype=torch.long),
            "prompt_ids": torch.full((size, prompt_width), self.pad_id, dtype=torch.long),
            "prompt_attention_mask": torch.zeros((size, prompt_width), dtype=torch.long),
        }
        for row, (example, _) in enumerate(items):
            length = len(example.sequence) - 1
            batch["input_ids"][row, :length] = example.sequence[:-1]
            batch["labels"][row, :length] = example.labels
            batch["attention_mask"][row, :length] = 1
            start = prompt_width - len(example.prompt)
            batch["prompt_ids"][row, start:] = example.prompt
            batch["prompt_attention_mask"][row, start:] = 1
        return batch


class PairDataset(Dataset):
    """Tokenised prompt/response pairs; batch them with :attr:`collate`."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        tokenizer: Any,
        max_length: int,
        max_prompt_length: int | None = None,
    ) -> None:
        self.pairs = list(pairs)
        tokenize = _PairTokenizer(tokenizer, max_length, max_prompt_length)
        self.examples = [tokenize(prompt, response) for prompt, response in self.pairs]
        self.collate = PairCollator(_pad_id(tokenizer))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[PairExample, int]:
        return self.examples[index], index

    def targets(self) -> Iterable[torch.Tensor]:
        # an empty prompt leaves the first response token with no position predicting it
        return (example.sequence[max(len(example.prompt), 1) :] for example in self.examples)

    def target_ids(self) -> torch.Tensor:
        return torch.cat([torch.zeros(0, dtype=torch.long), *self.targets()])


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """The ``(prompt, response)`` pairs of a JSONL file (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"JSONL file {path} does not exist")
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not JSON ({error.msg}); each line is an object") from None
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{path}:{number}: a {type(record).__name__}, not an object with 'prompt', 'response'"
                )
            for key in ("prompt", "response"):
                if key not in record:
                    raise ConfigError(f"{path}:{number}: missing key '{key}' (each line needs 'prompt' and 'response')")
                if not isinstance(record[key], str):
                    raise ConfigError(f"{path}:{number}: '{key}' is a {type(record[key]).__name__}, not a string")
            pairs.append((record["prompt"], record["response"]))
    return pairs


def jsonl_files(path: str | Path | Sequence[str | Path]) -> list[Path]:
    """A JSONL file, every ``*.jsonl`` of a folder (sorted), or a list of files."""
    if isinstance(path, str | Path):
        path = Path(path).expanduser()
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if not files:
                raise DataNotFoundError(f"folder {path} has no files matching *.jsonl")
            return files
        return [path]
    return [Path(p).expanduser() for p in path]


def write_jsonl(path: str | Path, pairs: Iterable[tuple[str, str]]) -> Path:
    """Write ``(prompt, response)`` pairs as JSONL, atomically (e.g. a teacher's generations for
    sequence-level KD); :func:`read_jsonl` reads them back exactly."""
    lines = [
        json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False) + "\n" for prompt, response in pairs
    ]
    atomic_write_text(Path(path), "".join(lines))
    return Path(path)


def split_pairs(pairs: Sequence[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
    """(train, validation) by a hash of each prompt (one prompt never lands in both); validation
    gets at least the prompt with the smallest hash."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    fractions = [hash_fraction(prompt) for prompt, _ in pairs]
    threshold = max(val_fraction, min(fractions, default=0.0) + 1e-12)  # all copies of that prompt
    held = [f < threshold for f in fractions]
    train = [pair for pair, h in zip(pairs, held, strict=True) if not h]
    validation = [pair for pair, h in zip(pairs, held, strict=True) if h]
    if not train or not validation:
        raise ConfigError(f"{len(pairs)} pairs do not make a train and a validation split; give more or a val_path")
    return train, validation


def _dedent(line: str, columns: int) -> str:
    """``line`` less ``columns`` leading blanks (kept whole when it has fewer, e.g. docstring text)."""
    return line if line[:columns].strip(" \t") else line[columns:]


_DEF_LINE = re.compile(r"([ \t]*)(?:async[ \t]+)?def[ \t]+\w+")
_DOCSTRING_START = re.compile(r"[ \t]*[rRuU]?(\"\"\"|\'\'\')")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _signature_end(lines: list[str], start: int) -> int | None:
    """The line that ends the ``def`` starting at ``start`` with ``:``; None for a one-line body."""
    depth = 0
    for end in range(start, min(start + 40, len(lines))):
        code = lines[end].split("#", 1)[0].rstrip()
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        if depth <= 0:
            return end if code.endswith(":") else None
    return None


def function_pairs(source: str, response_bytes: int = 256) -> list[tuple[str, str]]:
    """(``def`` line(s) + docstring, the next ``response_bytes`` bytes of the body) for each
    documented function of a Python source, in source order, dedented to the ``def``'s column.

    Simple line logic rather than ``ast``: parsing the whole stdlib takes ~10 s on 2 slow cores,
    this a fraction of a second. A function counts when the line after its signature opens a
    triple-quoted docstring; its body is the following lines indented deeper than the ``def``.
    """
    lines = source.splitlines(keepends=True)
    pairs = []
    for start, line in enumerate(lines):
        match = _DEF_LINE.match(line) if "def" in line else None
        signature_end = _signature_end(lines, start) if match else None
        if match is None or signature_end is None or signature_end + 1 >= len(lines):
            continue
        column = len(match.group(1))
        opening = _DOCSTRING_START.match(lines[signature_end + 1])
        if opening is None or _indent(lines[signature_end + 1]) <= column:
            continue
        quote = opening.group(1)
        docstring_end = signature_end + 1
        if quote not in lines[docstring_end][opening.end() :]:
            docstring_end += 1
            while docstring_end < len(lines) and quote not in lines[docstring_end]:
                docstring_end += 1
            if docstring_end == len(lines):
                continue
        body_end = docstring_end + 1
        while body_end < len(lines) and (not lines[body_end].strip() or _indent(lines[body_end]) > column):
            body_end += 1
        while not lines[body_end - 1].strip():  # trailing blank lines belong to no one
            body_end -= 1
        prompt = "".join(_dedent(text, column) for text in lines[start : docstring_end + 1])
        body = "".join(_dedent(text, column) for text in lines[docstring_end + 1 : body_end])
        response = body.encode("utf-8")[:response_bytes].decode("utf-8", errors="ignore")
        if response.strip():
            pairs.append((prompt, response))
    return pairs


def corpus_function_pairs(corpus: TextCorpus, split: str, response_bytes: int = 256) -> list[tuple[str, str]]:
    """:func:`function_pairs` of every file of a corpus split (hash order, within its cap)."""
    return [
        pair
        for _, data in corpus.read(split)
        for pair in function_pairs(data.decode("utf-8", errors="replace"), response_bytes)
    ]


class SampleDataset(Dataset):
    """Ready-made samples as equal-width [N, T] tensors (e.g. a teacher's generations turned into
    training rows: ``input_ids``, ``labels``, ``attention_mask``); row i gets index i."""

    collate = None  # the default collation stacks the equal-width rows

    def __init__(self, samples: dict[str, torch.Tensor]) -> None:
        missing = [key for key in ("input_ids", "labels", "attention_mask") if key not in samples]
        if missing:
            raise ConfigError(f"generated samples lack {', '.join(missing)} (have {', '.join(sorted(samples))})")
        self.samples = {key: value.long() for key, value in samples.items() if key != "index" and value.dim() == 2}
        self.size = len(samples["input_ids"])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**{key: value[index] for key, value in self.samples.items()}, "index": index}

    def targets(self) -> Iterable[torch.Tensor]:
        return (row[row != IGNORE_INDEX] for row in self.samples["labels"])

    def target_ids(self) -> torch.Tensor:
        labels = self.samples["labels"]
        return labels[labels != IGNORE_INDEX]


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
        return _pad_id(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return _eos_id(self.tokenizer)

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
