"""Grid tables: a paper's comparison table (methods x teacher/student pairs) run by kdlab.

A grid table YAML names the paper table it reproduces (``paper``, ``paper_table``), maps each of the
table's columns to a kdlab experiment (``pairs``) and each row to how it is run (``rows``: the
teacher stage, the student alone, a registered method, or explicit overrides). At ``scale: full``
the columns are the paper's own and each cell is compared with its published number; at ``scale:
mini`` (MNIST-1D stand-ins of the paper's pair shapes) the comparison is the methods' ordering.
Each cell's accuracy is read the way its paper read it (``accuracy_at``: best or last epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdlab.catalog import load_experiment
from kdlab.config import to_dict
from kdlab.errors import ConfigError, DataNotFoundError, KdlabError, did_you_mean, unknown
from kdlab.methods import METHODS
from kdlab.pipeline import Plan, plan_experiment
from kdlab.published import BASELINE_ROWS, PaperTable, load_paper_entry
from kdlab.tables import Cell, RowSpec
from kdlab.wandb_tables import cell_runtime

SCALES = ("full", "mini")
METRIC_AT = {"best_epoch": "test/top1_best", "last_epoch": "test/top1"}


@dataclass(frozen=True)
class GridRow:
    key: str  # the paper table's row name
    label: str
    stage: str = "student"
    overrides: tuple[str, ...] = ()
    metric: str | None = None  # another metric than the paper's top-1 (an exit's, say)


@dataclass(frozen=True)
class NotApplicable:
    row: str
    pairs: tuple[str, ...]  # empty: every pair
    reason: str

    def covers(self, row: str, pair: str) -> bool:
        return self.row == row and (not self.pairs or pair in self.pairs)


@dataclass(frozen=True)
class GridSpec:
    name: str
    title: str
    scale: str
    paper: dict[str, Any]  # the citation (key, title, authors, venue), for the provenance line
    published: PaperTable
    seeds: int
    pairs: dict[str, str]  # column -> experiment
    rows: tuple[GridRow, ...]
    not_applicable: tuple[NotApplicable, ...] = ()
    notes: str = ""
    pair_labels: tuple[tuple[str, str], ...] = ()

    @property
    def metric(self) -> str:
        return METRIC_AT[self.published.accuracy_at]

    @property
    def columns(self) -> tuple[str, ...]:  # what W&B records as the table's columns
        return tuple(self.pairs)

    def pair_label(self, pair: str) -> str:
        return dict(self.pair_labels).get(pair, pair)

    def reason_not_applicable(self, row: str, pair: str) -> str | None:
        return next((n.reason for n in self.not_applicable if n.covers(row, pair)), None)

    def published_value(self, row: str, pair: str) -> float | None:
        """The paper's number for this cell; only full-scale columns are the paper's own."""
        return self.published.value(row, pair) if self.scale == "full" else None

    def unmapped(self) -> list[str]:
        """Published cells this table does not run (and does not call not applicable)."""
        if self.scale != "full":
            return []
        rows = {r.key for r in self.rows}
        return [
            f"{row}@{pair}"
            for row, pair, _ in self.published.cells()
            if (row not in rows or pair not in self.pairs) and self.reason_not_applicable(row, pair) is None
        ]


def _row(raw: Any, where: str) -> GridRow:
    if isinstance(raw, str):
        raw = {"key": raw}
    if not isinstance(raw, dict) or "key" not in raw:
        raise ConfigError(f"{where}: a row is a name (teacher, student, a method) or {{key, label?, overrides?}}")
    key, overrides = str(raw["key"]), tuple(str(o) for o in raw.get("overrides", ()))
    stage = str(raw.get("stage", "teacher" if key == "teacher" else "student"))
    if stage not in ("teacher", "student"):
        raise ConfigError(f"{where}: stage must be 'teacher' or 'student', got '{stage}'")
    if not overrides and key not in BASELINE_ROWS:
        if key not in METHODS.names():
            hint = did_you_mean(key, [*BASELINE_ROWS, *METHODS.names()])
            raise ConfigError(
                f"{where}: row '{key}' is not a registered method"
                + (f" ({hint})" if hint else "")
                + "; give it overrides (e.g. [scheme=dml]) if it is not a method"
            )
        overrides = (f"method.name={key}",)
    if key == "student" and not overrides:
        overrides = ("method.name=ce",)
    default_label = {"teacher": "Teacher", "student": "Student"}.get(key, key.upper().replace("_", "+"))
    metric = raw.get("metric")
    return GridRow(key, str(raw.get("label", default_label)), stage, overrides, None if metric is None else str(metric))


def load_grid(name: str, data: dict[str, Any]) -> GridSpec:
    """Check a grid table YAML against its paper table; one line per problem, naming the key."""
    where = f"table '{name}'"
    scale = str(data.get("scale", ""))
    if scale not in SCALES:
        raise unknown(f"scale of {where}", scale, SCALES)
    paper = load_paper_entry(str(data.get("paper")))
    table_key = str(data.get("paper_table"))
    if table_key not in paper.tables:
        raise unknown(f"paper_table of {where} (paper '{paper.key}')", table_key, paper.tables)
    published = paper.tables[table_key]
    raw_pairs = data.get("pairs") or {}
    pairs, labels = {}, []
    for pair, value in raw_pairs.items():
        experiment = value["experiment"] if isinstance(value, dict) else value
        pairs[str(pair)] = str(experiment)
        if isinstance(value, dict) and "label" in value:
            labels.append((str(pair), str(value["label"])))
        if scale == "full" and pair not in published.pairs:
            raise unknown(f"pair of {where} (paper table '{paper.key}.{table_key}')", str(pair), published.pairs)
    rows = tuple(_row(raw, f"{where}, rows[{i}]") for i, raw in enumerate(data.get("rows") or ()))
    if not pairs or not rows:
        raise ConfigError(f"{where}: a grid table needs pairs and rows")
    keys = [r.key for r in rows]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where}: row keys repeat: {sorted({k for k in keys if keys.count(k) > 1})}")
    not_applicable = []
    for i, raw in enumerate(data.get("not_applicable") or ()):
        entry = NotApplicable(str(raw["row"]), tuple(raw.get("pairs") or ()), " ".join(str(raw["reason"]).split()))
        if entry.row not in keys and entry.row not in published.results:
            raise unknown(f"row of {where}, not_applicable[{i}]", entry.row, keys)
        for pair in entry.pairs:
            if pair not in pairs and pair not in published.pairs:
                raise unknown(f"pair of {where}, not_applicable[{i}]", pair, [*pairs, *published.pairs])
        not_applicable.append(entry)
    return GridSpec(
        name=name,
        title=str(data.get("title", name)),
        scale=scale,
        paper={"key": paper.key, "title": paper.title, "authors": paper.authors, "venue": paper.venue},
        published=published,
        seeds=int(data.get("seeds", 1)),
        pairs=pairs,
        rows=rows,
        not_applicable=tuple(not_applicable),
        notes=" ".join(str(data.get("notes", "")).split()),
        pair_labels=tuple(labels),
    )


@dataclass
class GridCell:
    row: GridRow
    pair: str
    cell: Cell
    plan: Plan | None = None
    invalid: str | None = None  # a cell that could not be planned (unknown experiment, bad override)
    no_data: bool = False  # it could not be planned only because its dataset is not on this machine


def plan_grid(spec: GridSpec, seeds: list[int], overrides: list[str], only: list[str] | None = None) -> list[GridCell]:
    """Plan every applicable cell. A cell that cannot be planned (an unknown experiment, say) is
    kept with its error, so the rest of the table still runs and renders."""
    rows = spec.rows
    if only:
        keys = [r.key for r in rows]
        for name in only:
            if name not in keys:
                raise unknown(f"row of table '{spec.name}' (--only)", name, keys)
        rows = tuple(r for r in rows if r.key in only)
    cells = []
    for seed in seeds:
        for row in rows:
            for pair, experiment in spec.pairs.items():
                if spec.reason_not_applicable(row.key, pair) is not None:
                    continue
                label = f"{row.label} | {spec.pair_label(pair)}"
                cell = GridCell(row, pair, Cell(RowSpec(label, experiment, row.stage, None, row.overrides), seed))
                try:
                    config = load_experiment(experiment, [*row.overrides, *overrides, f"seed={seed}"])
                    config.runtime = cell_runtime(config.runtime, spec.name, experiment, row.overrides, seed)
                    cell.plan = plan_experiment(config)
                    _check_cell(spec, cell.plan, row)
                except KdlabError as error:
                    cell.invalid = f"{type(error).__name__}: {error}".splitlines()[0]
                    cell.no_data = isinstance(error, DataNotFoundError)
                cells.append(cell)
    return cells


def _check_cell(spec: GridSpec, plan: Plan, row: GridRow) -> None:
    """The cell's run must measure what the paper measured (and a teacher row needs a teacher)."""
    config = plan.config
    if row.stage == "teacher":
        if plan.teacher_run is None:
            raise ConfigError(f"row '{row.key}': method '{config.method.name}' has no teacher")
        train = config.teacher.train
    else:
        train = config.student.train
    if (row.metric or spec.metric) == METRIC_AT["best_epoch"] and not train.test_every_epoch:
        raise ConfigError(
            f"the paper reads best-epoch accuracy but this run does not test every epoch "
            f"(set {row.stage}.train.test_every_epoch: true in its experiment)"
        )


def collect_finished(cells: list[GridCell]) -> None:
    """Fill in cells whose runs already finished (or failed), without training anything."""
    for grid_cell in cells:
        if grid_cell.plan is None:
            continue
        run = grid_cell.plan.stage_run(grid_cell.row.stage)
        assert run is not None
        grid_cell.cell.run_dir = run.dir
        if run.is_finished():
            grid_cell.cell.metrics = run.metrics()
        elif run.status_path.exists() and run.status().get("state") == "failed":
            grid_cell.cell.error = str(run.status().get("error", "failed")).splitlines()[0]


def resolved_configs(cells: list[GridCell]) -> dict[str, Any]:
    """Each planned cell's full resolved config, for ``--dry-run``'s plan file."""
    return {
        f"{c.row.key}@{c.pair}/seed{c.cell.seed}": to_dict(c.plan.config) if c.plan else {"invalid": c.invalid}
        for c in cells
    }
