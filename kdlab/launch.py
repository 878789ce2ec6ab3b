"""Launchers: run a sweep's cells as a Slurm job array (submitit), or one after another here.

Each Slurm job runs :class:`CellJob`, which is the ``kdlab run`` execute path. On preemption or
near its time limit Slurm sends SIGUSR2 (``--signal=USR2@90``); submitit then calls
``CellJob.checkpoint``, which hands back the same job (the dinov2 pattern), and requeues it. Nothing
needs saving at that moment: kdlab already writes ``checkpoints/last.ckpt`` after every epoch, and
the requeued job resumes from it (each epoch's shuffle and augmentation depend only on seed and
epoch, so the final metrics equal an uninterrupted run's); the epoch in flight is redone.

The local launcher runs cells in this process, one after another: a workstation has one set of
cores (or GPUs) to share, and a failed cell is recorded and skipped like a table's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from rich.console import Console

from kdlab.cells import plan_cell, run_stage
from kdlab.config import ExperimentConfig
from kdlab.errors import KdlabError
from kdlab.pipeline import Plan
from kdlab.sweeps import Sweep, SweepCell, load_sweep, sweep_dir, sweep_name, sweep_states, wait

LAUNCHERS = ("local", "slurm")


class CellJob:
    """One sweep cell as a submitit job: plan and execute the experiment (reusing or resuming its
    runs), return the cell's metrics."""

    def __init__(self, config: Any, stage: str = "student") -> None:  # either kind (kdlab.cells)
        self.config = config
        self.stage = stage

    def __call__(self) -> dict[str, Any]:
        return run_stage(plan_cell(self.config), self.stage)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue the same cell: its runs resume from their last per-epoch checkpoint."""
        return submitit.helpers.DelayedSubmission(CellJob(self.config, self.stage))


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    gpus_per_node: int = 0  # one task per GPU; 0: a CPU job with one task
    nodes: int = 1
    time_minutes: int = 240
    cpus_per_task: int = 1

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "nodes", "cpus_per_task", "time_minutes"):
            least = 0 if name == "gpus_per_node" else 1
            if getattr(self, name) < least:
                raise KdlabError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}")


def parse_time(text: str) -> int:
    """Slurm's ``--time`` formats (minutes, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) -> minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise KdlabError(f"--time '{text}' is not a Slurm time (valid: minutes, H:MM:SS or D-H:MM:SS)")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) or match.group(4):  # D-H[:MM[:SS]] or H:MM:SS
        hours, minutes, seconds = first, second, third
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, first, second
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise KdlabError(f"--time '{text}' must be at least one minute")
    return total


def slurm_executor(folder: Path, name: str, options: SlurmOptions) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    parameters: dict[str, Any] = {
        "name": f"kdlab-{name}",
        "timeout_min": options.time_minutes,
        "nodes": options.nodes,
        "tasks_per_node": max(options.gpus_per_node, 1),
        "cpus_per_task": options.cpus_per_task,
    }
    if options.gpus_per_node:
        parameters["gpus_per_node"] = options.gpus_per_node
    if options.partition:
        parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    return executor


def submit(sweep: Sweep, configs: Sequence[ExperimentConfig], options: SlurmOptions, console: Console) -> int:
    """Submit, as one job array, every cell that is neither finished nor queued or running; write
    the manifest. Returns the number of jobs submitted."""
    states = sweep_states(sweep)
    todo = [
        (cell, config)
        for cell, config, state in zip(sweep.cells, configs, states, strict=True)
        if state.state == "failed" or (state.state == "pending" and cell.job_id is None)
    ]
    skipped = sum(s.state == "done" for s in states)
    if todo:
        executor = slurm_executor(sweep.jobs_dir, sweep.name, options)
        with executor.batch():
            jobs = [executor.submit(CellJob(config, cell.stage)) for cell, config in todo]
        for (cell, _), job in zip(todo, jobs, strict=True):
            cell.job_id, cell.stdout, cell.stderr = job.job_id, str(job.paths.stdout), str(job.paths.stderr)
    sweep.save()
    queued = len(sweep.cells) - skipped - len(todo)
    console.print(
        f"sweep {sweep.name}: submitted {len(todo)} jobs, {skipped} cells already done, {queued} still queued;"
        f" manifest {sweep.manifest_path}",
        highlight=False,
    )
    return len(todo)


def run_local(sweep: Sweep, configs: Sequence[ExperimentConfig], console: Console) -> None:
    """Run the unfinished cells here, one after another; a failed cell is recorded and skipped."""
    sweep.save()
    for number, (cell, config) in enumerate(zip(sweep.cells, configs, strict=True), 1):
        if cell.run.is_finished():
            continue
        console.print(f"[bold]cell {number}/{len(sweep.cells)}[/bold]: {cell.label or '(base config)'}")
        try:
            CellJob(config, cell.stage)()
        except Exception as error:  # noqa: BLE001 - one failed cell must not stop the sweep
            console.print(f"[red]cell failed[/red]: {type(error).__name__}: {error}".splitlines()[0])


def new_sweep(name: str, runs_dir: str | Path, launcher: str, cells: list[SweepCell]) -> Sweep:
    """A sweep's manifest, keeping the job ids of an earlier submission of the same cells."""
    folder = sweep_dir(runs_dir, name)
    sweep = Sweep(name, folder, launcher, cells)
    if (folder / "manifest.json").exists():
        earlier = {c.run_dir + c.stage: c for c in load_sweep(str(folder)).cells}
        for cell in cells:
            old = earlier.get(cell.run_dir + cell.stage)
            if old is not None and launcher == "slurm":
                cell.job_id, cell.stdout, cell.stderr = old.job_id, old.stdout, old.stderr
    return sweep


def table_on_slurm(
    table: str, planned: Sequence[tuple[Any, Plan]], overrides: Sequence[str], options: SlurmOptions, console: Console
) -> None:
    """Run a table's planned cells (``kdlab.tables.Cell``) as one job array, wait with the job
    table, then fill in each cell's metrics, or its error line and log path."""
    cells = []
    for cell, plan in planned:
        run = plan.stage_run(cell.row.stage)
        overrides_of_cell = [*cell.row.overrides, *overrides, f"seed={cell.seed}"]
        label = f"{cell.row.label}, seed {cell.seed}"
        cells.append(SweepCell(cell.row.experiment, overrides_of_cell, str(run.dir.resolve()), cell.row.stage, label))
    name = sweep_name(f"table-{table}", [f"{c.experiment} {c.stage} {' '.join(c.overrides)}" for c in cells])
    sweep = new_sweep(name, planned[0][1].config.runtime.runs_dir, "slurm", cells)
    submit(sweep, [plan.config for _, plan in planned], options, console)
    for (cell, _), swept, state in zip(planned, cells, wait(sweep, console), strict=True):
        cell.run_dir = Path(swept.run_dir)
        if state.state == "done":
            cell.metrics = swept.run.metrics()
        else:
            cell.error = f"{state.detail} (log {state.log})"
