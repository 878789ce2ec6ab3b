"""``kdlab table``: run or reuse every cell of a comparison table, then render it beside the paper.

A table YAML names rows (an experiment, optionally its teacher stage, optional overrides and the
key of a published number); each row runs once per seed. Every cell is planned (validated)
before any of them trains; a cell that fails to train is shown as failed with its run folder, and
the rest of the table still renders.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from kdlab.catalog import papers_dir, table_registry
from kdlab.cells import cell_method, load_cell_config, plan_cell, run_stage
from kdlab.config import RuntimeConfig, load_yaml
from kdlab.errors import ConfigError, KdlabError, unknown
from kdlab.files import atomic_write_json, atomic_write_text
from kdlab.launch import SlurmOptions, table_on_slurm
from kdlab.markdown import markdown_table
from kdlab.pipeline import Plan
from kdlab.plots import table_figure
from kdlab.wandb_tables import cell_runtime, log_table

if TYPE_CHECKING:
    from kdlab.paper_tables import GridSpec


@dataclass(frozen=True)
class Column:
    header: str
    metric: str
    format: Callable[[float], str]
    spread: bool = True  # show "mean ± std" (False: the mean alone, for counts)


def _params(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


COLUMNS: dict[str, Column] = {
    "top1": Column("Top-1 (%)", "test/top1", lambda v: f"{v:.2f}"),
    "nll": Column("NLL", "test/nll", lambda v: f"{v:.3f}"),
    "ece": Column("ECE (%)", "test/ece", lambda v: f"{v:.2f}"),
    "ece_calibrated": Column("ECE, T-scaled (%)", "test/ece_calibrated", lambda v: f"{v:.2f}"),
    "params": Column("Params", "params", _params, spread=False),
    "epochs": Column("Epochs", "epochs", lambda v: f"{v:.0f}", spread=False),
    "int8_top1": Column("Top-1, int8 (%)", "test/int8/top1", lambda v: f"{v:.2f}"),
    "size_kb": Column("Size (KB)", "size_bytes", lambda v: f"{v / 1024:.1f}", spread=False),
    # Language-model tables (kdlab/lm): the text's held-out files.
    "bpb": Column("Bits/byte (val)", "test/bpb", lambda v: f"{v:.3f}"),
    "agreement": Column("Teacher agreement (%)", "test/agreement", lambda v: f"{v:.2f}"),
    "kl": Column("KL(teacher‖student) (nats/token)", "test/kl", lambda v: f"{v:.3f}"),
    "train_minutes": Column("Train (min)", "wall_seconds", lambda v: f"{v / 60:.1f}"),
    # The student's model card (`kdlab card`, or `kdlab table --card`): batch-1 CPU inference.
    "latency_ms": Column("Latency, batch 1 (ms)", "card/latency_ms", lambda v: f"{v:.3f}"),
    "speedup": Column("Speed-up vs teacher", "card/speedup", lambda v: f"{v:.1f}x"),
    "memory_mb": Column("Peak memory (MiB)", "card/peak_memory_mb", lambda v: f"{v:.1f}"),
    "disk_kb": Column("Size, fp32 (KB)", "card/size_bytes", lambda v: f"{v / 1024:.1f}", spread=False),
}
CARD_COLUMNS = ("latency_ms", "speedup", "memory_mb", "disk_kb")
STAGES = ("student", "teacher")


@dataclass(frozen=True)
class RowSpec:
    label: str
    experiment: str
    stage: str = "student"
    published: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    paper: dict[str, Any] | None
    seeds: int
    columns: tuple[str, ...]
    rows: tuple[RowSpec, ...]
    notes: str = ""


@dataclass
class Cell:
    row: RowSpec
    seed: int
    metrics: dict[str, Any] | None = None
    run_dir: Path | None = None
    error: str | None = None
    data_root: str | None = None  # where the cell's dataset lives (a model card reads it again)


@dataclass
class TableResult:
    spec: TableSpec | GridSpec
    seeds: list[int]
    cells: list[Cell]
    wall_seconds: float
    files: list[Path] = field(default_factory=list)
    runtime: RuntimeConfig | None = None  # the cells' (W&B settings and group); None: the defaults


def load_paper(key: str) -> dict[str, Any]:
    path = papers_dir() / f"{key}.yaml"
    if not path.exists():
        raise unknown("paper", key, [p.stem for p in papers_dir().glob("*.yaml")])
    return load_yaml(path)


def load_table(name: str) -> TableSpec | GridSpec:
    """Parse and check a table YAML (a registered name or a path): a row table (rows of
    experiments) or a grid table (a paper's methods x pairs, see kdlab.paper_tables)."""
    from kdlab.paper_tables import load_grid

    path = Path(name) if name.endswith((".yaml", ".yml")) and Path(name).exists() else table_registry().get(name)
    data = load_yaml(path)
    name = path.stem
    if "pairs" in data:
        return load_grid(name, data)
    return _load_row_table(name, data)


def table_scale(spec: TableSpec | GridSpec) -> str:
    """Row tables are MNIST-1D tables (mini); grid tables say their scale."""
    return getattr(spec, "scale", "mini")


def find_table(name: str, scale: str | None) -> TableSpec | GridSpec:
    """A table by name, or a paper's table of the given scale (``kdlab table crd --scale mini``)."""
    if name in table_registry().names() or name.endswith((".yaml", ".yml")) or not scale:
        spec = load_table(name)
        if scale and table_scale(spec) != scale:
            raise ConfigError(f"table '{spec.name}' is {table_scale(spec)} scale, not {scale}")
        return spec
    papers = {p.stem for p in papers_dir().glob("*.yaml")}
    if name not in papers:
        raise unknown("table or paper", name, [*table_registry().names(), *sorted(papers)])
    candidates = [t for t in table_registry().names() if load_yaml(table_registry().get(t)).get("paper") == name]
    matching = [t for t in candidates if table_scale(load_table(t)) == scale]
    if len(matching) != 1:
        found = ", ".join(matching) or "none"
        raise ConfigError(f"paper '{name}' has {len(matching)} {scale}-scale tables ({found}); name one of them")
    return load_table(matching[0])


def _load_row_table(name: str, data: dict[str, Any]) -> TableSpec:
    paper = load_paper(data["paper"]) if data.get("paper") else None
    published = (paper or {}).get("numbers", {}).get("top1", {})
    columns = tuple(data.get("columns", ["top1", "params"]))
    for column in columns:
        if column not in COLUMNS:
            raise unknown(f"column of table '{name}'", column, COLUMNS)
    rows = []
    for raw in data.get("rows", []):
        row = RowSpec(
            label=raw["label"],
            experiment=raw["experiment"],
            stage=raw.get("stage", "student"),
            published=raw.get("published"),
            overrides=tuple(raw.get("overrides", [])),
        )
        if row.stage not in STAGES:
            raise ConfigError(f"table '{name}', row '{row.label}': stage must be one of {STAGES}, got '{row.stage}'")
        if row.published is not None and row.published not in published:
            raise unknown(f"published number of paper '{data['paper']}'", row.published, published)
        rows.append(row)
    if not rows:
        raise ConfigError(f"table '{name}' has no rows")
    notes = " ".join(str(data.get("notes", "")).split())
    return TableSpec(name, data.get("title", name), paper, int(data.get("seeds", 1)), columns, tuple(rows), notes)


def plan_table(
    spec: TableSpec, seeds: Sequence[int], overrides: Sequence[str], only: Sequence[str] | None = None
) -> list[tuple[Cell, Plan]]:
    """Validate every cell before anything trains (bad names and overrides fail here). ``only``:
    keep the rows of these methods ("teacher" for teacher rows)."""
    planned = []
    for seed in seeds:
        for row in spec.rows:
            config = load_cell_config(row.experiment, [*row.overrides, *overrides, f"seed={seed}"])
            config.runtime = cell_runtime(config.runtime, spec.name, row.experiment, row.overrides, seed)
            try:
                plan = plan_cell(config)
            except KdlabError as error:
                raise type(error)(f"table '{spec.name}', row '{row.label}': {error}") from None
            if row.stage == "teacher" and plan.teacher_run is None:
                raise ConfigError(
                    f"table '{spec.name}', row '{row.label}': method '{cell_method(plan, 'student')}' has no teacher"
                )
            planned.append((Cell(row, seed, data_root=getattr(plan.config.data, "root", None)), plan))
    if only:
        names = {cell_method(p, c.row.stage) for c, p in planned}
        for name in only:
            if name not in names:
                raise unknown(f"method of table '{spec.name}' (--only)", name, sorted(names))
        planned = [(c, p) for c, p in planned if cell_method(p, c.row.stage) in only]
    return planned


def run_table(
    spec: TableSpec,
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    console: Console | None = None,
    slurm: SlurmOptions | None = None,
    only: Sequence[str] | None = None,
) -> TableResult:
    """Plan every cell, then run it here, one after another, or (``slurm``) as a Slurm job array."""
    console = console or Console()
    started = time.perf_counter()
    planned = plan_table(spec, seeds, overrides, only)
    if slurm is None:
        _run_here(planned, console)
    else:  # waits for the jobs, then fills in each cell's metrics, or its error line and log path
        table_on_slurm(spec.name, planned, overrides, slurm, console)
    cells, runtime = [c for c, _ in planned], planned[0][1].config.runtime if planned else None
    return TableResult(spec, list(seeds), cells, time.perf_counter() - started, runtime=runtime)


def _run_here(planned: list[tuple[Cell, Plan]], console: Console) -> None:
    for number, (cell, plan) in enumerate(planned, 1):
        console.print(f"[bold]cell {number}/{len(planned)}[/bold]: {cell.row.label}, seed {cell.seed}")
        run = plan.stage_run(cell.row.stage)
        assert run is not None  # plan_table checked that teacher rows have a teacher
        cell.run_dir = run.dir
        try:
            cell.metrics = run_stage(plan, cell.row.stage)
        except Exception as error:  # noqa: BLE001 - one failed cell must not hide the others
            cell.error = f"{type(error).__name__}: {error}".splitlines()[0]
            console.print(f"[red]cell failed[/red]: {cell.error} (run folder {cell.run_dir})")


def add_cards(result: TableResult, console: Console) -> None:
    """Measure the model card of every finished student cell that has none yet (``kdlab card``
    re-measures one), and show the card columns after the table's own."""
    from kdlab.deploy.card import build_card, write_card

    for cell in result.cells:
        if cell.metrics is None or cell.run_dir is None or cell.row.stage != "student":
            continue
        if "card/latency_ms" not in cell.metrics:
            console.print(f"[bold]model card[/bold]: {cell.row.label}, seed {cell.seed}")
            cell.metrics = {**cell.metrics, **write_card(build_card(cell.run_dir, cell.data_root))}
    spec = result.spec
    result.spec = replace(spec, columns=(*spec.columns, *(c for c in CARD_COLUMNS if c not in spec.columns)))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(result: TableResult) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Header, display rows (mean ± std over seeds) and machine-readable rows for the CSV."""
    spec = result.spec
    published = (spec.paper or {}).get("numbers", {}).get("top1", {})
    header = ["Model", *(COLUMNS[c].header for c in spec.columns)]
    if spec.paper:
        header += ["Published top-1 (%)", "Δ top-1"]
    display, records = [], []
    for row in spec.rows:
        cells = [c for c in result.cells if c.row == row]
        done = [c.metrics for c in cells if c.metrics is not None]
        failed = [c for c in cells if c.error is not None]
        line, record = [row.label], {"label": row.label, "experiment": row.experiment, "stage": row.stage}
        record["seeds_done"], record["seeds_failed"] = len(done), len(failed)
        for name in spec.columns:
            column = COLUMNS[name]
            values = [float(m[column.metric]) for m in done if m.get(column.metric) is not None]
            if not values:
                line.append("failed" if failed else "—")
                continue
            mean, std = _mean_std(values)
            record[f"{name}_mean"], record[f"{name}_std"] = mean, std
            line.append(f"{column.format(mean)} ± {column.format(std)}" if column.spread else column.format(mean))
        if spec.paper:
            reference = published.get(row.published) if row.published else None
            record["published_top1"] = reference
            line.append("—" if reference is None else f"{reference}")
            if reference is not None and "top1_mean" in record:
                record["delta_top1"] = record["top1_mean"] - reference
                line.append(f"{record['delta_top1']:+.2f}")
            else:
                line.append("—")
        if failed:
            line[0] += f" ({len(failed)} failed: see {failed[0].run_dir})"
        display.append(line)
        records.append(record)
    return header, display, records


def provenance(result: TableResult) -> str:
    """Seeds, epochs, wall time and versions: what a reader needs to trust the numbers."""
    import lightning
    import torch

    finished = [c for c in result.cells if c.metrics]
    timed = {str(c.run_dir): c.metrics["wall_seconds"] for c in finished if "wall_seconds" in c.metrics}
    untimed = len({str(c.run_dir) for c in finished if "wall_seconds" not in c.metrics})
    training = f"; the cells' runs trained for {sum(timed.values()) / 60:.1f} min in all" if timed else ""
    if untimed:
        training += f" ({untimed} runs without a recorded time)"
    epochs = sorted({int(c.metrics["epochs"]) for c in result.cells if c.metrics and "epochs" in c.metrics})
    paper = result.spec.paper
    cite = (
        f" Published: {paper['authors']}, {paper['title']} ({paper['venue']}); {paper.get('source', '')}"
        if paper
        else ""
    )
    return (
        f"Seeds {', '.join(map(str, result.seeds))}; epochs {', '.join(map(str, epochs)) or 'n/a'}; "
        f"mean ± std over seeds; test split. This invocation took {result.wall_seconds / 60:.1f} min{training}; "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), {time.strftime('%Y-%m-%d')}. "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, lightning {lightning.__version__}."
        f"{cite}"
    )


def write_outputs(result: TableResult, out_dir: Path, console: Console | None = None) -> list[Path]:
    """Print the rich table and write markdown, CSV, PNG and the raw per-cell JSON."""
    console = console or Console()
    header, display, records = summarize(result)
    note = " ".join(filter(None, [result.spec.notes, provenance(result)]))
    table = Table(title=result.spec.title, caption=note, caption_justify="left")
    for name in header:
        table.add_column(name, justify="left" if name == "Model" else "right")
    for line in display:
        table.add_row(*line)
    console.print(table)

    stem = out_dir / result.spec.name
    markdown = [f"# {result.spec.title}", "", *markdown_table(header, display)]
    markdown += ["", note, ""]
    atomic_write_text(stem.with_suffix(".md"), "\n".join(markdown))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({k for r in records for k in r}, key=_csv_order))
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    table_figure(header, display, stem.with_suffix(".png"), title=result.spec.title, footer=note)
    log_table(result, header, display, records, stem.with_suffix(".png"))
    cells = [
        {
            "label": c.row.label,
            "seed": c.seed,
            "run_dir": str(c.run_dir),
            "error": c.error,
            "metrics": c.metrics,
        }
        for c in result.cells
    ]
    atomic_write_json(stem.with_suffix(".json"), {"table": result.spec.name, "provenance": note, "cells": cells})
    files = [stem.with_suffix(s) for s in (".md", ".csv", ".png", ".json")]
    console.print("wrote " + ", ".join(str(f) for f in files))
    return files


def _csv_order(key: str) -> tuple[int, str]:
    first = ["label", "experiment", "stage", "seeds_done", "seeds_failed"]
    return (first.index(key), key) if key in first else (len(first), key)
