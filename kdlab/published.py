"""Typed loader and checker for the paper registry (``papers/*.yaml``, shipped as ``kdlab.papers``).

One YAML per paper: citation (``key``, ``title``, ``authors``, ``venue``, ``year``, ``arxiv``), the
flat ``numbers: {metric: {key: value}}`` map that ``kdlab table`` reads, and ``tables:``, several
published tables, each with its ``source`` (which repository file or paper table the numbers were
transcribed from), its ``protocol``, ``accuracy_at`` (``best_epoch`` or ``last_epoch``: how the paper
read its accuracy), its ``pairs`` (the columns: a student and, for distillation, its teacher) and
``results`` (row -> pair -> number). A row is named as the paper names it (``teacher``, ``student``,
a method such as ``kd``, or a scheme such as ``dml``); which kdlab run produces it is the business of
the table YAML that reproduces it (``experiments/tables/``), which is checked against these rows.
Numbers a table lacks are listed under its ``missing:`` with the reason. Every error is one line
naming the file and the key.

(This module is not ``kdlab/papers.py``: that name is the ``kdlab.papers`` package, the YAML folder.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.catalog import papers_dir
from kdlab.config import load_yaml
from kdlab.errors import ConfigError, did_you_mean, unknown

# Rows that are not distillation methods: the teacher and the student trained alone.
BASELINE_ROWS = ("teacher", "student")
REQUIRED_PAPER_KEYS = ("key", "title", "authors", "venue", "year", "arxiv", "numbers")
REQUIRED_TABLE_KEYS = ("title", "source", "protocol", "accuracy_at", "metric", "pairs", "results")
ACCURACY_AT = ("best_epoch", "last_epoch")
_ROW_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Missing:
    """Numbers a table does not give: one row, on some pairs (empty: all pairs), and why."""

    row: str
    reason: str
    pairs: tuple[str, ...] = ()

    def covers(self, row: str, pair: str) -> bool:
        return self.row == row and (not self.pairs or pair in self.pairs)


@dataclass(frozen=True)
class Pair:
    """One column of a published table: the student and (None for schemes without one) its teacher."""

    student: str
    teacher: str | None = None


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    source: str
    protocol: dict[str, Any]
    accuracy_at: str
    metric: str
    pairs: dict[str, Pair]
    results: dict[str, dict[str, float]]
    missing: tuple[Missing, ...] = ()
    notes: str = ""

    def value(self, row: str, pair: str) -> float | None:
        return self.results.get(row, {}).get(pair)

    def is_missing(self, row: str, pair: str) -> bool:
        return any(m.covers(row, pair) for m in self.missing)

    def cells(self) -> list[tuple[str, str, float]]:
        """Every published number as (row, pair, value), in the file's order."""
        return [(row, pair, value) for row, values in self.results.items() for pair, value in values.items()]


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    authors: str
    venue: str
    year: int
    arxiv: str
    path: Path
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)
    tables: dict[str, PaperTable] = field(default_factory=dict)
    missing: str = ""


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, "expected a non-empty string")
    return value.strip()


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"expected a number, got {value!r}")
    return float(value)


def _row(name: str, where: str) -> str:
    if not _ROW_NAME.match(name):
        raise _fail(where, f"row name '{name}' must be lower-case letters, digits and '_' (kd, crd_kd, teacher)")
    return name


def _missing(raw: Any, where: str, pairs: Mapping[str, Pair]) -> tuple[Missing, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, "expected a list of {row, reason, pairs?}")
    out = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        entry = _mapping(entry, at)
        row = _row(_text(entry.get("row"), f"{at}.row"), f"{at}.row")
        entry_pairs = tuple(entry.get("pairs") or ())
        for pair in entry_pairs:
            if pair not in pairs:
                raise unknown(f"pair of {at}.pairs", pair, pairs)
        out.append(Missing(row, _text(entry.get("reason"), f"{at}.reason"), entry_pairs))
    return tuple(out)


def _table(name: str, raw: Any, where: str) -> PaperTable:
    raw = _mapping(raw, where)
    for key in REQUIRED_TABLE_KEYS:
        if key not in raw or raw[key] in (None, "", {}):
            raise _fail(f"{where}.{key}", "required (every table names its source, protocol, pairs and results)")
    protocol = _mapping(raw["protocol"], f"{where}.protocol")
    if "dataset" not in protocol:
        raise _fail(f"{where}.protocol.dataset", "required")
    pairs = {}
    for pair, spec in _mapping(raw["pairs"], f"{where}.pairs").items():
        spec = _mapping(spec, f"{where}.pairs.{pair}")
        teacher = spec.get("teacher")
        pairs[pair] = Pair(
            _text(spec.get("student"), f"{where}.pairs.{pair}.student"),
            None if teacher is None else _text(teacher, f"{where}.pairs.{pair}.teacher"),
        )
    accuracy_at = raw["accuracy_at"]
    if accuracy_at not in ACCURACY_AT:
        raise unknown(f"{where}.accuracy_at", str(accuracy_at), ACCURACY_AT)
    results: dict[str, dict[str, float]] = {}
    for row, values in _mapping(raw["results"], f"{where}.results").items():
        at = f"{where}.results.{row}"
        _row(row, at)
        results[row] = {}
        for pair, value in _mapping(values, at).items():
            if pair not in pairs:
                hint = did_you_mean(pair, pairs)
                raise _fail(f"{at}.{pair}", "pair not listed under 'pairs'" + (f"; {hint}" if hint else ""))
            results[row][pair] = _number(value, f"{at}.{pair}")
    return PaperTable(
        name=name,
        title=_text(raw["title"], f"{where}.title"),
        source=_text(raw["source"], f"{where}.source"),
        protocol=protocol,
        accuracy_at=accuracy_at,
        metric=_text(raw["metric"], f"{where}.metric"),
        pairs=pairs,
        results=results,
        missing=_missing(raw.get("missing"), f"{where}.missing", pairs),
        notes=str(raw.get("notes", "")).strip(),
    )


def load_paper_file(path: Path) -> Paper:
    """Load and check one paper YAML; a problem raises ConfigError naming the file and the key."""
    where = path.name
    data = _mapping(load_yaml(path), where)
    for key in REQUIRED_PAPER_KEYS:
        if key not in data or data[key] is None:
            raise _fail(f"{where}: {key}", "required")
    if data["key"] != path.stem:
        raise _fail(f"{where}: key", f"'{data['key']}' must equal the file name '{path.stem}'")
    arxiv = str(data["arxiv"])
    if not (len(arxiv) in (9, 10) and arxiv[4] == "." and arxiv.replace(".", "").isdigit()):
        raise _fail(f"{where}: arxiv", f"'{arxiv}' is not a new-style arXiv id (YYMM.NNNNN, quoted)")
    year = data["year"]
    if not isinstance(year, int) or not 1990 <= year <= 2100:
        raise _fail(f"{where}: year", f"expected a year, got {year!r}")
    venue = _text(data["venue"], f"{where}: venue")
    if str(year) not in venue:
        raise _fail(f"{where}: venue", f"'{venue}' should name the year {year} (e.g. 'ICLR {year}')")
    numbers = {}
    for metric, row in _mapping(data["numbers"], f"{where}: numbers").items():
        numbers[metric] = {
            str(k): _number(v, f"{where}: numbers.{metric}.{k}") for k, v in _mapping(row, f"numbers.{metric}").items()
        }
    tables = {
        name: _table(name, raw, f"{where}: tables.{name}")
        for name, raw in _mapping(data.get("tables") or {}, f"{where}: tables").items()
    }
    if not tables and not numbers and not str(data.get("missing", "")).strip():
        raise _fail(f"{where}: missing", "a paper without numbers or tables must say why under 'missing:'")
    return Paper(
        key=data["key"],
        title=_text(data["title"], f"{where}: title"),
        authors=_text(data["authors"], f"{where}: authors"),
        venue=venue,
        year=year,
        arxiv=arxiv,
        path=path,
        numbers=numbers,
        tables=tables,
        missing=str(data.get("missing", "")).strip(),
    )


def paper_files() -> list[Path]:
    return sorted(papers_dir().glob("*.yaml"))


def load_paper_entry(key: str) -> Paper:
    path = papers_dir() / f"{key}.yaml"
    if not path.exists():
        raise unknown("paper", key, [p.stem for p in paper_files()])
    return load_paper_file(path)


def load_all_papers() -> dict[str, Paper]:
    return {path.stem: load_paper_file(path) for path in paper_files()}
