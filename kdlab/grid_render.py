"""Render a grid table: ours beside the paper's, per cell, with each method's rank.

Full scale: each cell shows ``mean ± std (published, Δ)`` and the heat map shows ours - published.
Mini scale: the columns are MNIST-1D stand-ins, so the comparison is the ordering: each method's
mean rank here beside its mean rank in the paper's table (Spearman's rho between the two), and the
heat map shows each method's gain over its student, beside the paper's mean gain.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdlab.files import atomic_write_json, atomic_write_text
from kdlab.markdown import markdown_table
from kdlab.paper_tables import GridCell, GridSpec
from kdlab.plots import delta_heatmap, table_figure


@dataclass
class CellSummary:
    values: list[float] = field(default_factory=list)
    planned: int = 0
    failed: list[str] = field(default_factory=list)  # "error (run folder)"
    invalid: str | None = None
    not_applicable: str | None = None
    published: float | None = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.published is None else self.mean - self.published


def summarize_cells(spec: GridSpec, cells: Iterable[GridCell]) -> dict[tuple[str, str], CellSummary]:
    """One summary per (row, pair) of the table, over seeds."""
    summary = {
        (row.key, pair): CellSummary(
            not_applicable=spec.reason_not_applicable(row.key, pair), published=spec.published_value(row.key, pair)
        )
        for row in spec.rows
        for pair in spec.pairs
    }
    for grid_cell in cells:
        entry = summary[(grid_cell.row.key, grid_cell.pair)]
        entry.planned += 1
        cell = grid_cell.cell
        metric = grid_cell.row.metric or spec.metric
        if grid_cell.invalid:
            entry.invalid = grid_cell.invalid
        elif cell.error:
            entry.failed.append(f"{cell.error} (run folder {cell.run_dir})")
        elif cell.metrics is not None and metric in cell.metrics:
            entry.values.append(float(cell.metrics[metric]))
    return summary


def _average_ranks(scores: dict[str, float]) -> dict[str, float]:
    """Rank 1 = best; ties share the mean of their ranks."""
    ordered = sorted(scores, key=lambda k: -scores[k])
    ranks: dict[str, float] = {}
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and scores[ordered[j + 1]] == scores[ordered[i]]:
            j += 1
        for k in ordered[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mean_ranks(columns: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each row's mean rank over the columns where it has a score (column -> row -> score)."""
    per_row: dict[str, list[float]] = {}
    for scores in columns.values():
        for row, rank in _average_ranks(scores).items():
            per_row.setdefault(row, []).append(rank)
    return {row: statistics.fmean(ranks) for row, ranks in per_row.items()}


def ranked_rows(spec: GridSpec) -> list[str]:
    """The rows that compete: every row but the teacher (the student alone is the baseline)."""
    return [r.key for r in spec.rows if r.stage != "teacher"]


def our_ranks(spec: GridSpec, summary: dict[tuple[str, str], CellSummary]) -> dict[str, float]:
    rows = ranked_rows(spec)
    columns = {pair: {row: m for row in rows if (m := summary[(row, pair)].mean) is not None} for pair in spec.pairs}
    return mean_ranks(columns)


def paper_ranks(spec: GridSpec) -> dict[str, float]:
    """The same rows' mean ranks in the published table (over the paper's own columns)."""
    rows = [r for r in ranked_rows(spec) if r in spec.published.results]
    columns = {
        pair: {row: v for row in rows if (v := spec.published.value(row, pair)) is not None}
        for pair in spec.published.pairs
    }
    return mean_ranks(columns)


def spearman(a: dict[str, float], b: dict[str, float]) -> tuple[float | None, int]:
    """Spearman's rho between two rankings over their common rows, and how many rows that is."""
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return None, len(common)
    ra = _average_ranks({k: -a[k] for k in common})
    rb = _average_ranks({k: -b[k] for k in common})
    xs, ys = [ra[k] for k in common], [rb[k] for k in common]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = (sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)) ** 0.5
    return (num / den if den else None), len(common)


def paper_gains(spec: GridSpec) -> dict[str, float]:
    """Each row's mean gain over the paper's student across the paper's columns."""
    gains: dict[str, list[float]] = {}
    for pair in spec.published.pairs:
        base = spec.published.value("student", pair)
        for row in spec.published.results:
            value = spec.published.value(row, pair)
            if base is not None and value is not None:
                gains.setdefault(row, []).append(value - base)
    return {row: statistics.fmean(values) for row, values in gains.items()}


def cell_text(entry: CellSummary, full: bool, seeds: int) -> str:
    if entry.not_applicable:
        return "n/a"
    if entry.invalid:
        return "invalid"
    published = f" ({entry.published:.2f}, {entry.delta:+.2f})" if full and entry.delta is not None else ""
    if entry.mean is None:
        reference = f" ({entry.published:.2f})" if full and entry.published is not None else ""
        return ("failed" if entry.failed else "—") + reference
    partial = f" [{len(entry.values)}/{seeds}]" if len(entry.values) < seeds else ""
    return f"{entry.mean:.2f} ± {entry.std:.2f}{partial}{published}"


@dataclass
class GridReport:
    header: list[str]
    display: list[list[str]]
    records: list[dict[str, Any]]  # one per row (W&B)
    long: list[dict[str, Any]]  # one per cell (CSV)
    notes: list[str]
    heat: list[list[float | None]]
    heat_columns: list[str]


def build_report(spec: GridSpec, cells: list[GridCell], seeds: int) -> GridReport:
    summary = summarize_cells(spec, cells)
    full = spec.scale == "full"
    ours = our_ranks(spec, summary)
    theirs = paper_ranks(spec)
    header = ["Method", *(spec.pair_label(p) for p in spec.pairs), "Mean rank"]
    if not full:
        header.append("Paper's mean rank")
    display, records, long, heat = [], [], [], []
    gains = paper_gains(spec)
    for row in spec.rows:
        line, record = [row.label], {"label": row.label, "row": row.key}
        heat_row: list[float | None] = []
        for pair in spec.pairs:
            entry = summary[(row.key, pair)]
            line.append(cell_text(entry, full, seeds))
            record[f"{pair}_mean"], record[f"{pair}_std"] = entry.mean, entry.std if entry.values else None
            if full:
                record[f"{pair}_published"] = entry.published
                heat_row.append(entry.delta)
            else:
                base = summary[("student", pair)].mean if ("student", pair) in summary else None
                heat_row.append(None if entry.mean is None or base is None else entry.mean - base)
            long.append(
                {
                    "row": row.key,
                    "label": row.label,
                    "pair": pair,
                    "experiment": spec.pairs[pair],
                    "metric": row.metric or spec.metric,
                    "seeds_done": len(entry.values),
                    "seeds_failed": len(entry.failed),
                    "mean": entry.mean,
                    "std": entry.std if entry.values else None,
                    "published": entry.published,
                    "delta": entry.delta,
                    "status": "n/a"
                    if entry.not_applicable
                    else "invalid"
                    if entry.invalid
                    else "failed"
                    if entry.failed and not entry.values
                    else "done"
                    if entry.values
                    else "missing",
                }
            )
        rank = ours.get(row.key)
        line.append("—" if rank is None else f"{rank:.1f}")
        record["mean_rank"] = rank
        if not full:
            paper_rank = theirs.get(row.key)
            line.append("—" if paper_rank is None else f"{paper_rank:.1f}")
            record["paper_mean_rank"] = paper_rank
            heat_row.append(gains.get(row.key) if row.key in spec.published.results else None)
        display.append(line)
        records.append(record)
        heat.append(heat_row)
    heat_columns = [spec.pair_label(p) for p in spec.pairs] + ([] if full else ["paper (mean)"])
    return GridReport(header, display, records, long, _notes(spec, summary, ours, theirs), heat, heat_columns)


def _notes(
    spec: GridSpec, summary: dict[tuple[str, str], CellSummary], ours: dict[str, float], theirs: dict[str, float]
) -> list[str]:
    notes = [spec.notes] if spec.notes else []
    accuracy = "best-epoch" if spec.published.accuracy_at == "best_epoch" else "last-epoch"
    notes.append(
        f"Cells: {accuracy} test top-1 (%) as in {spec.paper['title']} ({spec.published.title}), "
        f"mean ± std over seeds; rank 1 = best among the non-teacher rows, averaged over columns."
    )
    if spec.scale == "full":
        notes.append("In parentheses: the published number and ours minus it.")
    else:
        rho, count = spearman(ours, theirs)
        agreement = "n/a" if rho is None else f"{rho:+.2f}"
        notes.append(
            f"Ordering against the paper: Spearman's rho between our mean ranks and the paper's = {agreement} "
            f"over {count} rows (the paper's ranks over its own columns)."
        )
    for entry_key, entry in summary.items():
        where = f"{entry_key[0]}@{entry_key[1]}"
        if entry.not_applicable:
            notes.append(f"n/a {where}: {entry.not_applicable}.")
        elif entry.invalid:
            notes.append(f"invalid {where}: {entry.invalid}.")
        elif entry.failed:
            notes.append(f"failed {where} ({len(entry.failed)} of {entry.planned} seeds): {entry.failed[0]}.")
    unmapped = spec.unmapped()
    if unmapped:
        notes.append(f"Published but not in this table: {', '.join(unmapped)}.")
    return notes


def write_grid(spec: GridSpec, report: GridReport, provenance_line: str, out_dir: Path, console: Console) -> list[Path]:
    """Print the rich table; write markdown, CSV (one line per cell), the table PNG and the heat map."""
    note = " ".join([*report.notes, provenance_line])
    table = Table(title=spec.title, caption=note, caption_justify="left")
    for name in report.header:
        table.add_column(name, justify="left" if name == "Method" else "right")
    for line in report.display:
        table.add_row(*line)
    console.print(table)
    stem = out_dir / spec.name
    markdown = [f"# {spec.title}", "", *markdown_table(report.header, report.display)]
    markdown += ["", *report.notes, "", provenance_line, "", f"![ours vs published]({spec.name}-delta.png)", ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(markdown))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.long[0]))
    writer.writeheader()
    writer.writerows(report.long)
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    table_figure(report.header, report.display, stem.with_suffix(".png"), title=spec.title, footer=note)
    heat_path = out_dir / f"{spec.name}-delta.png"
    full = spec.scale == "full"
    delta_heatmap(
        report.heat,
        [line[0] for line in report.display],
        report.heat_columns,
        heat_path,
        title=f"{spec.title}: " + ("ours - published" if full else "gain over the student alone"),
        legend="top-1 points",
    )
    return [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png"), heat_path]


def write_cells_json(spec: GridSpec, cells: list[GridCell], provenance_line: str, out_dir: Path) -> Path:
    path = out_dir / f"{spec.name}.json"
    atomic_write_json(
        path,
        {
            "table": spec.name,
            "provenance": provenance_line,
            "cells": [
                {
                    "row": c.row.key,
                    "pair": c.pair,
                    "seed": c.cell.seed,
                    "run_dir": str(c.cell.run_dir) if c.cell.run_dir else None,
                    "error": c.cell.error or c.invalid,
                    "metrics": c.cell.metrics,
                }
                for c in cells
            ],
        },
    )
    return path
