"""A comparison table in W&B: its cells' runs share one group, and the rendered table (as a
``wandb.Table``) and its PNG go to a run of their own (job type ``table``) in that group.

Like every W&B call in kdlab this follows ``runtime.wandb`` / ``WANDB_MODE`` and never fails the
table: the markdown, CSV and PNG are already written when W&B is tried, and an error only warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.config import RuntimeConfig
from kdlab.loggers import wandb_mode
from kdlab.wandb_ablation import ablation_runtime, swept_values

if TYPE_CHECKING:
    from kdlab.tables import TableResult


def table_group(name: str) -> str:
    """The W&B group of a table's cells and of its own run."""
    return f"table/{name}"


def cell_runtime(
    runtime: RuntimeConfig, table: str, experiment: str, overrides: Sequence[str], seed: int
) -> RuntimeConfig:
    """A table cell's runtime: the table's group; the row's experiment and overrides and the seed as
    the swept keys, so W&B can line the rows up in parallel coordinates and group them."""
    swept = {"experiment": experiment, **swept_values(overrides), "seed": seed}
    return ablation_runtime(runtime, table_group(table), swept, tags=[f"table:{table}"])


def table_columns(
    header: Sequence[str], display: Sequence[Sequence[str]], records: Sequence[dict[str, Any]]
) -> tuple[list[str], list[list[Any]]]:
    """The rendered table, each row followed by its CSV values (label aside: it is the Model column),
    so W&B can sort and chart the numbers behind the ``mean ± std`` strings."""
    extra = list(dict.fromkeys(key for record in records for key in record if key != "label"))
    rows = [[*line, *(record.get(key) for key in extra)] for line, record in zip(display, records, strict=True)]
    return [*header, *extra], rows


def log_table(
    result: TableResult,
    header: Sequence[str],
    display: Sequence[Sequence[str]],
    records: Sequence[dict[str, Any]],
    image: Path,
) -> None:
    """Log the table and its PNG to a ``table`` run in the cells' group; warn, never raise, on error."""
    spec = result.spec
    runtime = result.runtime or RuntimeConfig()
    try:
        mode = wandb_mode(runtime.wandb)
        if mode == "disabled":
            return
        import wandb

        folder = Path(runtime.runs_dir) / "tables" / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        columns, rows = table_columns(header, display, records)
        with wandb.init(
            name=table_group(spec.name),
            project=runtime.wandb_project,
            entity=runtime.wandb_entity,
            group=runtime.wandb_group or table_group(spec.name),
            job_type="table",
            tags=list(dict.fromkeys([f"table:{spec.name}", "stage:table", *runtime.wandb_tags])),
            dir=str(folder),
            mode=mode,
            reinit="create_new",  # a failed cell's unfinished run is left alone
            config={"table": spec.name, "title": spec.title, "seeds": result.seeds, "columns": list(spec.columns)},
            settings=wandb.Settings(quiet=True, silent=True, console="off", init_timeout=30, disable_git=True),
        ) as run:
            run.log(
                {
                    "comparison": wandb.Table(columns=columns, data=rows, allow_mixed_types=True),
                    "comparison_image": wandb.Image(str(image)),
                }
            )
            run.summary["wall_seconds"] = result.wall_seconds
    except Exception as error:  # noqa: BLE001 - the table's files are written; W&B is a bonus
        warnings.warn(f"the table was not logged to W&B: {error!r}", stacklevel=2)
