"""``kdlab table`` for grid tables: plan every cell, run the missing ones (here or on Slurm), render.

``--dry-run`` trains nothing: it lists every cell with its experiment, overrides, published
number and whether a finished run exists, and writes each cell's resolved config to a plan file.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kdlab.config import to_yaml
from kdlab.files import atomic_write_text
from kdlab.grid_render import build_report, write_cells_json, write_grid
from kdlab.launch import SlurmOptions, table_on_slurm
from kdlab.paper_tables import GridCell, GridSpec, collect_finished, plan_grid, resolved_configs
from kdlab.tables import TableResult, _run_here, provenance
from kdlab.wandb_tables import log_table


def _report_invalid(cells: list[GridCell], console: Console) -> None:
    """Before anything trains: one line per cell that cannot run (one line in all for missing data)."""
    no_data = sorted({c.invalid for c in cells if c.no_data and c.invalid})
    for message in no_data:
        console.print(f"[yellow]cells cannot be planned here[/yellow]: {message}")
    for cell in cells:
        if cell.invalid and not cell.no_data and cell.cell.seed == cells[0].cell.seed:
            console.print(f"[red]cell cannot run[/red] {cell.row.key}@{cell.pair}: {cell.invalid}")


def dry_run(spec: GridSpec, cells: list[GridCell], out_dir: Path, console: Console) -> Path:
    """List every cell and what exists of it; write the resolved configs."""
    collect_finished(cells)
    table = Table(title=f"{spec.name}: {len(cells)} cells ({spec.scale} scale)", title_justify="left")
    for column in ("cell", "seed", "experiment + overrides", "published", "status", "run"):
        table.add_column(column, overflow="fold")
    metric = spec.metric
    for cell in cells:
        published = spec.published_value(cell.row.key, cell.pair)
        if cell.no_data:
            status = "[yellow]no dataset here[/yellow] (see above)"
        elif cell.invalid:
            status = f"[red]invalid[/red]: {cell.invalid}"
        elif cell.cell.metrics is not None:
            value = cell.cell.metrics.get(cell.row.metric or metric)
            status = f"[green]done[/green] {value:.2f}" if value is not None else "done (metric missing)"
        elif cell.cell.error:
            status = f"[red]failed[/red]: {cell.cell.error}"
        else:
            status = "not run"
        command = " ".join([cell.cell.row.experiment, *cell.row.overrides]) + (
            " (teacher stage)" if cell.row.stage == "teacher" else ""
        )
        run = str(cell.cell.run_dir) if cell.cell.run_dir else "—"
        table.add_row(
            f"{cell.row.key}@{cell.pair}",
            str(cell.cell.seed),
            command,
            "—" if published is None else f"{published:.2f}",
            status,
            run,
        )
    console.print(table)
    plan_file = out_dir / f"{spec.name}.plan.yaml"
    atomic_write_text(plan_file, to_yaml(resolved_configs(cells)))
    done = sum(c.cell.metrics is not None for c in cells)
    console.print(f"{done} of {len(cells)} cells finished; resolved configs in {plan_file}")
    for unmapped in spec.unmapped():
        console.print(f"[yellow]published but not in this table[/yellow]: {unmapped}")
    return plan_file


def run_grid_table(
    spec: GridSpec,
    seeds: list[int],
    overrides: list[str],
    out_dir: Path,
    console: Console,
    slurm: SlurmOptions | None = None,
    only: list[str] | None = None,
    dry: bool = False,
    collect: bool = False,
) -> list[Path]:
    """Plan, run what is missing (``collect``: run nothing, render what has finished), render."""
    started = time.perf_counter()
    cells = plan_grid(spec, seeds, overrides, only)
    out_dir.mkdir(parents=True, exist_ok=True)
    _report_invalid(cells, console)
    if dry:
        return [dry_run(spec, cells, out_dir, console)]
    planned = [(c.cell, c.plan) for c in cells if c.plan is not None]
    if collect:
        collect_finished(cells)
    elif planned and slurm is None:
        _run_here(planned, console)
    elif planned:
        table_on_slurm(spec.name, planned, overrides, slurm, console)
    result = TableResult(spec, seeds, [c.cell for c in cells], time.perf_counter() - started)  # type: ignore[arg-type]
    result.runtime = planned[0][1].config.runtime if planned else None
    line = provenance(result)
    report = build_report(spec, cells, len(seeds))
    files = write_grid(spec, report, line, out_dir, console)
    files.append(write_cells_json(spec, cells, line, out_dir))
    log_table(result, report.header, report.display, report.records, files[2])
    console.print("wrote " + ", ".join(str(f) for f in files))
    return files
