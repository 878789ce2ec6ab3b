"""A text corpus from files on this machine, split by file, cut into next-token blocks.

``TextCorpus.stdlib()`` is the running Python's own standard library (every machine has it);
any folder works too. Splits are made by hashing each file's relative path, never by a random
draw, so the same files give the same split on every machine.
"""

from __future__ import annotations

import os
import platform
import re
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kdlab.data.byte_tokens import encode_bytes, encode_text, eos_id_of, hash_fraction, is_byte_tokenizer
from kdlab.errors import ConfigError, DataNotFoundError

DEFAULT_PATTERNS = ("**/*.txt", "**/*.md", "**/*.rst", "**/*.py")
# Left out of the stdlib corpus: installed third-party code (differs per machine), the test suites
# (huge, repetitive, partly deliberately broken files) and IDLE; caches hold no sources.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
SPLITS = ("train", "validation")


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
        eos = eos_id_of(tokenizer)
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
