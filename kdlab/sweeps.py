"""Sweeps: a grid of experiment configs, its manifest, and the state of each cell.

``kdlab sweep mnist1d-kd method.params.temperature=1,4 seed=0,1`` is the product of the
comma-separated values: four cells, each an ordinary experiment config whose run folder is the one
``kdlab run`` would use (so finished cells are reused, and a cell's state is its run's). The
manifest, ``<runs_dir>/sweeps/<name>/manifest.json`` (written atomically), lists each cell's
overrides, run folder, Slurm job id and log paths: it is what ``kdlab status`` reads, together
with each run's ``status.json`` and the scheduler's state from ``sacct``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kdlab.cells import load_cell_config, plan_cell
from kdlab.config import ExperimentConfig
from kdlab.errors import ConfigError, KdlabError
from kdlab.files import atomic_write_json
from kdlab.runs import Run
from kdlab.wandb_ablation import ablation_runtime, swept_values

STATES = ("pending", "running", "done", "failed")
# The scheduler's job states, as cell states; any other (PENDING, REQUEUED, ...) is pending.
SLURM_STATES = {
    "RUNNING": "running",
    "COMPLETING": "running",
    "COMPLETED": "done",  # checked against metrics.json: a job can end without finishing its run
    **{s: "failed" for s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")},
}


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes, so ``teachers=[{},{}],[{}]`` is two values."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return [*values, current]


def parse_grid(items: Sequence[str]) -> list[list[str]]:
    """``key=a,b other=x,y`` -> the overrides of every cell (the product, first key slowest)."""
    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"sweep argument '{item}' is not key=value[,value...]")
        if key in axes:
            raise ConfigError(f"sweep key '{key}' is given twice; list its values once: {key}=a,b")
        values = [v.strip() for v in split_values(text)]
        if not text or any(not v for v in values):
            raise ConfigError(f"sweep key '{key}' has an empty value in '{item}'; give key=a,b,c")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep key '{key}' repeats a value in '{item}'")
        axes[key] = values
    return [[f"{k}={v}" for k, v in zip(axes, combo, strict=True)] for combo in itertools.product(*axes.values())]


@dataclass
class SweepCell:
    """One grid point: what to run, where its run lives, and the job that runs it."""

    experiment: str
    overrides: list[str]
    run_dir: str
    stage: str = "student"  # "teacher": the cell is the experiment's teacher run (table rows)
    label: str = ""
    job_id: str | None = None
    stdout: str | None = None
    stderr: str | None = None

    @property
    def run(self) -> Run:
        return Run(Path(self.run_dir), {})


@dataclass
class Sweep:
    name: str
    dir: Path
    launcher: str
    cells: list[SweepCell]
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def jobs_dir(self) -> Path:
        """submitit's folder: pickled jobs, results and each job's stdout/stderr."""
        return self.dir / "jobs"

    def save(self) -> None:
        record = {"name": self.name, "launcher": self.launcher, "created": self.created}
        atomic_write_json(self.manifest_path, {**record, "cells": [asdict(c) for c in self.cells]})


def plan_cells(experiment: str, grid: list[list[str]], name: str) -> list[tuple[SweepCell, ExperimentConfig]]:
    """Plan (validate) every cell before anything is submitted: a bad key or value fails here.
    The cells of sweep ``name`` share a W&B group, with the swept keys as top-level config."""
    cells = []
    varying = {i for i in range(len(grid[0])) if len({cell[i] for cell in grid}) > 1}
    for overrides in grid:
        label = " ".join(o for i, o in enumerate(overrides) if i in varying)
        swept = [o for i, o in enumerate(overrides) if i in varying]
        try:
            config = load_cell_config(experiment, overrides)  # image-classification or kind: lm
            config.runtime = ablation_runtime(
                config.runtime, f"sweep/{name}", swept_values(swept), tags=[f"sweep:{name}"]
            )
            plan = plan_cell(config)
        except KdlabError as error:
            raise type(error)(f"sweep cell {label or ' '.join(overrides) or experiment}: {error}") from None
        cell = SweepCell(experiment, overrides, str(plan.student_run.dir.resolve()), label=label)
        cells.append((cell, config))
    return cells


def sweep_name(experiment: str, items: Sequence[str]) -> str:
    """The same command names the same sweep, so re-running it resumes (and skips finished cells)."""
    digest = hashlib.sha256("\n".join([experiment, *items]).encode()).hexdigest()[:8]
    return f"{Path(experiment).stem}-{digest}"


def sweep_dir(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / "sweeps" / name


def load_sweep(name_or_path: str, runs_dir: str | Path = "runs") -> Sweep:
    """A sweep by name (under ``<runs_dir>/sweeps/``), folder or manifest path."""
    candidates = [Path(name_or_path), Path(name_or_path) / "manifest.json", sweep_dir(runs_dir, name_or_path)]
    manifest = next((p if p.is_file() else p / "manifest.json" for p in candidates if p.exists()), None)
    if manifest is None or not manifest.is_file():
        known = sorted(p.parent.name for p in (Path(runs_dir) / "sweeps").glob("*/manifest.json"))
        raise KdlabError(f"unknown sweep '{name_or_path}' (sweeps in {runs_dir}/sweeps: {', '.join(known) or 'none'})")
    data = json.loads(manifest.read_text())
    cells = [SweepCell(**cell) for cell in data["cells"]]
    return Sweep(data["name"], manifest.parent, data["launcher"], cells, data["created"])


def _query(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Each job's state: squeue's for jobs still queued (no accounting lag), else sacct's. A job in
    neither has left the queue on a cluster without accounting (sacct fails without slurmdbd)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    if not job_ids:
        return {}
    ids = ",".join(sorted({job.split("_")[0] for job in job_ids}))
    accounting = _query(["sacct", "-o", "JobID,State", "--parsable2", "-j", ids])
    states = {job: info["State"].split()[0] for job, info in SlurmInfoWatcher().read_info(accounting).items()}
    for line in _query(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ids]).splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state
    return states


@dataclass(frozen=True)
class CellState:
    state: str  # one of STATES
    detail: str = ""  # the scheduler's state, or the error line of a failed cell
    log: str = ""


def last_error_line(path: str | None) -> str:
    """The last line of a job's stderr that names an error (a traceback's last line)."""
    if not path or not Path(path).exists():
        return ""
    lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line]
    return (named or lines or [""])[-1][:300]


def cell_state(cell: SweepCell, slurm: dict[str, str]) -> CellState:
    """The run's own record (metrics.json, status.json) says done; the scheduler's state says
    whether a job that has not finished its run is still queued, running, or gone (failed)."""
    run, log = cell.run, cell.stderr or cell.run_dir
    if run.is_finished():
        return CellState("done", "", log)
    status = run.status()
    error = status.get("error", "") or last_error_line(cell.stderr)
    if cell.job_id is None:  # the local launcher, or not submitted yet
        state = {"running": "running", "failed": "failed"}.get(status["state"], "pending")
        return CellState(state, error if state == "failed" else "", log)
    raw = slurm.get(cell.job_id)
    if raw is None:
        return CellState("failed", error or "the job left the queue without finishing its run", log)
    state = SLURM_STATES.get(raw, "pending")
    if state == "done":  # the job ended, the run did not: a crash outside kdlab's bookkeeping
        return CellState("failed", error or "the job completed without writing metrics.json", log)
    return CellState(state, f"{raw}: {error}" if state == "failed" and error else raw, log)


def sweep_states(sweep: Sweep) -> list[CellState]:
    slurm = slurm_states([c.job_id for c in sweep.cells if c.job_id])
    return [cell_state(cell, slurm) for cell in sweep.cells]


def status_table(sweep: Sweep, states: Sequence[CellState]) -> Table:
    counts = ", ".join(f"{sum(s.state == name for s in states)} {name}" for name in STATES)
    table = Table(title=f"sweep {sweep.name} ({sweep.launcher}): {counts}", title_justify="left")
    for column in ("#", "cell", "state", "job", "detail", "run / log"):
        table.add_column(column, overflow="fold")
    colour = {"pending": "yellow", "running": "cyan", "done": "green", "failed": "red"}
    for i, (cell, state) in enumerate(zip(sweep.cells, states, strict=True)):
        where = cell.run_dir if state.state == "done" else state.log
        table.add_row(
            str(i),
            cell.label or "(base config)",
            f"[{colour[state.state]}]{state.state}[/]",
            cell.job_id or "—",
            state.detail,
            where,
        )
    return table


def wait(sweep: Sweep, console: Console, poll_seconds: float = 5.0) -> list[CellState]:
    """Poll until every cell is done or failed, showing the job table (live on a terminal; a line
    per change of the counts in a log)."""
    states = sweep_states(sweep)
    if console.is_terminal:
        with Live(status_table(sweep, states), console=console, refresh_per_second=1) as live:
            while not all(s.state in ("done", "failed") for s in states):
                time.sleep(poll_seconds)
                states = sweep_states(sweep)
                live.update(status_table(sweep, states))
        return states
    summary = ""
    while True:
        line = ", ".join(f"{sum(s.state == name for s in states)} {name}" for name in STATES)
        if line != summary:
            console.print(f"[{time.strftime('%H:%M:%S')}] sweep {sweep.name}: {line}", highlight=False)
            summary = line
        if all(s.state in ("done", "failed") for s in states):
            console.print(status_table(sweep, states))
            return states
        time.sleep(poll_seconds)
        states = sweep_states(sweep)
