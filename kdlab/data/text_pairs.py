"""Prompt/response pairs for supervised distillation: JSONL files, pairs cut from Python sources,
and their tokenisation (loss on the response only, prompts left-padded for generation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdlab.data.byte_tokens import (
    IGNORE_INDEX,
    encode_bytes,
    encode_text,
    eos_id_of,
    hash_fraction,
    is_byte_tokenizer,
    pad_id_of,
)
from kdlab.data.text_corpus import TextCorpus
from kdlab.errors import ConfigError, DataNotFoundError
from kdlab.files import atomic_write_text


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
        self.eos = torch.tensor([eos_id_of(tokenizer)])
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
        self.collate = PairCollator(pad_id_of(tokenizer))

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
