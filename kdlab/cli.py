"""The ``kdlab`` command: list what exists, run an experiment, build a comparison table, export
a student and write its model card."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from kdlab.errors import KdlabError
from kdlab.registry import Registry

KINDS = (
    "methods",
    "models",
    "datasets",
    "schemes",
    "callbacks",
    "lm-losses",
    "lm-models",
    "export-formats",
    "experiments",
    "tables",
)


def _registry(kind: str) -> Registry[Any]:
    if kind == "methods":
        from kdlab.methods import METHODS

        return METHODS
    if kind == "models":
        from kdlab.models import MODELS

        return MODELS
    if kind == "datasets":
        from kdlab.data import DATASETS

        return DATASETS
    if kind == "schemes":
        from kdlab.schemes import SCHEMES

        return SCHEMES
    if kind == "callbacks":
        from kdlab.callbacks import CALLBACKS

        return CALLBACKS
    if kind == "lm-losses":
        from kdlab.losses.lm import LM_LOSSES

        losses: Registry[Any] = Registry("LM loss")
        for name, loss in LM_LOSSES.items():
            losses.add(name, loss, (loss.__doc__ or "").strip().splitlines()[0])
        return losses
    if kind == "lm-models":
        from kdlab.lm.models import LM_PRESETS

        return LM_PRESETS
    if kind == "export-formats":
        from kdlab.deploy import EXPORT_FORMATS

        return EXPORT_FORMATS
    from kdlab.catalog import experiment_registry, table_registry

    return experiment_registry() if kind == "experiments" else table_registry()


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    for kind in [args.kind] if args.kind else KINDS:
        registry = _registry(kind)
        table = Table(title=f"{kind} ({len(registry)})", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        if kind == "models":
            table.add_column("timm name")
            table.add_column("input")
        if kind in ("schemes", "callbacks"):
            table.add_column("options (defaults)")
        for entry in registry.entries():
            extra = [entry.meta.get("timm_name", ""), entry.meta.get("input", "")] if kind == "models" else []
            if kind in ("schemes", "callbacks"):
                extra = [_options(entry.obj, kind)]
            table.add_row(entry.name, entry.description, *extra)
        console.print(table)
        if kind == "models":
            import timm

            console.print(f"...and any of timm's {len(timm.list_models())} models, by their timm name.")
    return 0


def _options(obj: Any, kind: str) -> str:
    """A scheme's ``scheme_params`` or a callback's ``params``, with their defaults."""
    import dataclasses
    import inspect

    if kind == "schemes":
        options = obj.Options()
        return ", ".join(f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))
    params = inspect.signature(obj).parameters.values()
    return ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)


def _teacher_runs(plan: Any) -> list[tuple[str, Any]]:
    """Label and run folder of every teacher run (each member of an ensemble)."""
    rows = []
    for i, teacher in enumerate(plan.teachers):
        label = "teacher run" + (f" {i}" if len(plan.teachers) > 1 else "")
        rows += [(label + (f" member {m}" if teacher.members else ""), run) for m, run in enumerate(teacher.runs)]
    return rows


def _ensemble_label(teacher: Any) -> str:
    return f" (ensemble of {len(teacher.members)}, first member's run)" if teacher.members else ""


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from kdlab.catalog import is_lm_experiment, load_experiment
    from kdlab.config import to_dict, to_yaml
    from kdlab.distributed import is_global_zero
    from kdlab.pipeline import execute_plan, plan_experiment

    if is_lm_experiment(args.experiment):
        return _run_lm(args, console)
    config = load_experiment(args.experiment, args.overrides)
    plan = plan_experiment(config)
    if args.dry_run:
        console.print(to_yaml(to_dict(config)), highlight=False, markup=False)
        runs = [
            *_teacher_runs(plan),
            *((f"assistant run {i}", link.run) for i, link in enumerate(plan.chain, start=1)),
            ("student run", plan.student_run),
        ]
        for label, run in runs:
            state = "finished" if run.is_finished() else run.status()["state"]
            console.print(f"{label}: {run.dir} ({state})")
        return 0
    outcome = execute_plan(plan)
    if not is_global_zero(config.runtime):  # every rank ran the plan; rank 0 alone reports it
        return 0
    teachers = plan.teachers
    for label, run, metrics in (
        *(
            (f"teacher{'' if len(teachers) == 1 else f' {i}'}{_ensemble_label(t)}", t.run, m)
            for i, (t, m) in enumerate(zip(plan.teachers, outcome.teachers, strict=True))
        ),
        *(
            (f"assistant {i}", link.run, m)
            for i, (link, m) in enumerate(zip(plan.chain, outcome.chain, strict=True), start=1)
        ),
        ("student", outcome.student_run, outcome.student),
    ):
        if run is not None and metrics is not None:
            summary = ", ".join(
                f"{key.removeprefix('test/')} {metrics[key]:.3f}"
                for key in ("test/top1", "test/nll", "test/ece")
                if key in metrics
            )
            console.print(f"[bold]{label}[/bold] {run.dir}: {summary}")
    return 0


def _run_lm(args: argparse.Namespace, console: Console) -> int:
    """``kdlab run`` of a ``kind: lm`` experiment: teacher -> (generations | store) -> student."""
    from kdlab.catalog import load_lm_experiment
    from kdlab.config import to_dict, to_yaml
    from kdlab.distributed import is_global_zero
    from kdlab.lm.pipeline import execute_lm_plan, plan_lm

    config = load_lm_experiment(args.experiment, args.overrides)
    plan = plan_lm(config)
    runs = [
        ("teacher run", plan.teacher_run),
        ("teacher generations", plan.generations_run),
        ("soft-label store", plan.store_run),
        ("student run", plan.student_run),
    ]
    if args.dry_run:
        console.print(to_yaml(to_dict(config)), highlight=False, markup=False)
        for label, run in runs:
            if run is not None:
                state = "finished" if run.is_finished() else run.status()["state"]
                console.print(f"{label}: {run.dir} ({state})")
        return 0
    teacher, student = execute_lm_plan(plan)
    if not is_global_zero(config.runtime):
        return 0
    for label, run, metrics in (("teacher", plan.teacher_run, teacher), ("student", plan.student_run, student)):
        if run is not None and metrics is not None:
            summary = ", ".join(
                f"{key.removeprefix('test/')} {metrics[key]:.3f}"
                for key in ("test/bpb", "test/agreement", "test/kl")
                if key in metrics
            )
            console.print(f"[bold]{label}[/bold] {run.dir}: {summary}")
    console.print(f"student saved for from_pretrained: {plan.student_run.dir / 'hf'}")
    return 0


def _slurm_options(args: argparse.Namespace) -> Any:
    """The Slurm options of ``sweep``/``table``; given with ``--launcher local``, they are an error."""
    from kdlab.launch import SlurmOptions, parse_time

    given = {name: getattr(args, name) for name in SLURM_FLAGS if getattr(args, name) is not None}
    if args.launcher != "slurm":
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise KdlabError(f"{flags} only apply to --launcher slurm (got --launcher {args.launcher})")
        return None
    if "time" in given:
        given["time_minutes"] = parse_time(given.pop("time"))
    return SlurmOptions(**given)


def cmd_table(args: argparse.Namespace, console: Console) -> int:
    from kdlab.catalog import is_lm_experiment
    from kdlab.grid_run import run_grid_table
    from kdlab.paper_tables import GridSpec
    from kdlab.tables import add_cards, find_table, plan_table, run_table, write_outputs

    spec = find_table(args.name, args.scale)
    seeds = list(range(args.seeds if args.seeds is not None else spec.seeds))
    if not seeds:
        raise KdlabError(f"--seeds must be at least 1, got {args.seeds}")
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    slurm = _slurm_options(args)
    if isinstance(spec, GridSpec):
        if args.card:
            raise KdlabError(f"--card applies to row tables; '{spec.name}' is a paper (grid) table")
        files = run_grid_table(
            spec, seeds, args.overrides, Path(args.out), console, slurm, only, args.dry_run, args.collect
        )
        return 0 if files else 1
    if args.collect:
        raise KdlabError(f"--collect applies to paper (grid) tables; '{spec.name}' is a row table")
    if args.card and any(is_lm_experiment(row.experiment) for row in spec.rows):
        raise KdlabError(f"--card measures classifier students; table '{spec.name}' has language-model rows")
    if args.dry_run:
        for cell, plan in plan_table(spec, seeds, args.overrides, only):
            run = plan.stage_run(cell.row.stage)
            state = "done" if run and run.is_finished() else run.status()["state"] if run else "?"
            console.print(f"{cell.row.label}, seed {cell.seed}: {cell.row.experiment} {cell.row.overrides} -> {state}")
        return 0
    result = run_table(spec, seeds, args.overrides, console, slurm, only)
    if args.card:
        add_cards(result, console)
    write_outputs(result, Path(args.out), console)
    return 1 if any(cell.error for cell in result.cells) else 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from kdlab.launch import new_sweep, run_local, submit
    from kdlab.sweeps import parse_grid, plan_cells, status_table, sweep_name, sweep_states, wait

    options = _slurm_options(args)
    name = args.name or sweep_name(args.experiment, args.overrides)
    planned = plan_cells(args.experiment, parse_grid(args.overrides), name)
    cells, configs = [cell for cell, _ in planned], [config for _, config in planned]
    sweep = new_sweep(name, configs[0].runtime.runs_dir, args.launcher, cells)
    if options is None:
        run_local(sweep, configs, console)
    else:
        submit(sweep, configs, options, console)
    states = wait(sweep, console) if options is not None and args.wait else sweep_states(sweep)
    if options is None or not args.wait:
        console.print(status_table(sweep, states))
    return 1 if any(state.state == "failed" for state in states) else 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from kdlab.sweeps import load_sweep, status_table, sweep_states

    sweep = load_sweep(args.sweep, args.runs_dir)
    console.print(status_table(sweep, sweep_states(sweep)))
    return 0


def cmd_teacher_report(args: argparse.Namespace, console: Console) -> int:
    from kdlab.teachers.report import teacher_report

    teacher_report(list(args.runs), Path(args.out), args.data_root, console)
    return 0


def cmd_cache(args: argparse.Namespace, console: Console) -> int:
    from kdlab.teachers.stored import cache_teacher_run

    path, manifest = cache_teacher_run(
        args.run, args.dataset, args.overrides, args.data_root, args.top_k, args.dtype, args.out, args.device
    )
    size = sum((path / name).stat().st_size for name in manifest["files"])
    samples = manifest["num_samples"]
    kind = "full logits" if manifest["top_k"] is None else f"top-{manifest['top_k']} logits + rest mass"
    console.print(
        f"[bold]store[/bold] {path}: {samples} samples x {manifest['num_classes']} classes, {kind},"
        f" {size / samples:.1f} bytes/sample, {size / 1e6:.2f} MB, written in {manifest['write_seconds']:.1f} s"
    )
    console.print(f"students read it with: teacher.source=cache teacher.store={path}", highlight=False)
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from kdlab.deploy.export import export_run

    with console.status(f"exporting {args.run} and checking it against PyTorch"):
        written = export_run(
            args.run, args.format, args.int8, args.data_root, args.min_agreement, args.calibration_samples
        )
    table = Table(title=f"{written[0].path.parent}: the student alone, checked against PyTorch")
    for column in ("file", "size", "split", "top-1 agreement (%)", "max |Δlogit|", "top-1 (%)", "PyTorch top-1 (%)"):
        table.add_column(column, justify="left" if column in ("file", "split") else "right")
    for item in written:
        parity = item.parity
        table.add_row(
            item.path.name,
            f"{item.size_bytes / 1024:.1f} KB",
            f"{item.split} ({parity.samples})",
            f"{parity.agreement:.2f}",
            f"{parity.max_abs_diff:.2g}",
            f"{parity.exported_top1:.2f}",
            f"{parity.reference_top1:.2f}",
        )
    console.print(table)
    for item in written[1:]:
        drops = {item.split: item.parity, "test": item.test}
        console.print(
            f"{item.precision}: top-1 drop against the float student "
            + ", ".join(f"{p.top1_drop:+.2f} points on {split} ({p.samples})" for split, p in drops.items())
        )
    return 0


def cmd_card(args: argparse.Namespace, console: Console) -> int:
    from kdlab.deploy.card import build_card, render_markdown, write_card

    with console.status(f"timing {args.run}: the student, its teacher(s) and exported files, {args.runs} calls each"):
        card = build_card(args.run, args.data_root, args.runs, args.warmup, args.threads)
    write_card(card)
    console.print(Markdown(render_markdown(card, f"Model card: {card.run_dir}")))
    console.print(f"written: {card.run_dir / 'card.md'}, card.png, card.json; card/* keys in metrics.json")
    return 0


SLURM_FLAGS = ("partition", "gpus_per_node", "nodes", "time", "cpus_per_task")


def _add_launcher_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--launcher",
        default="local",
        choices=("local", "slurm"),
        help="here, one cell after another (default),"
        " or every cell as a task of one Slurm job array (submitit); finished cells are skipped",
    )
    parser.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node, one task each (default 0)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes per cell (default 1)")
    parser.add_argument("--time", default=None, help="time limit per job, Slurm format (default 4:00:00)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show Lightning's info messages")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="what exists, with one-line descriptions")
    listing.add_argument("kind", nargs="?", choices=KINDS)
    listing.set_defaults(handler=cmd_list)

    run = commands.add_parser("run", help="run a named experiment (teacher -> calibration -> student)")
    run.add_argument("experiment", help="a name from `kdlab list experiments`, or a path to a YAML file")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. method.name=kd seed=1")
    run.add_argument("--dry-run", action="store_true", help="validate and print the resolved config only")
    run.set_defaults(handler=cmd_run)

    table = commands.add_parser("table", help="run or reuse every cell of a table and render it")
    table.add_argument("name", help="a name from `kdlab list tables`, or a paper key with --scale (crd)")
    table.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every cell")
    table.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the table's)")
    table.add_argument("--out", default="results", help="folder for the markdown, CSV, PNG and JSON")
    table.add_argument("--scale", choices=("mini", "full"), default=None, help="a paper's MNIST-1D or full table")
    table.add_argument("--only", default=None, help="comma-separated rows/methods to run, e.g. kd,crd,teacher")
    table.add_argument("--dry-run", action="store_true", help="list every cell, its config and run; train nothing")
    table.add_argument("--collect", action="store_true", help="render the finished cells only; train nothing")
    table.add_argument(
        "--card", action="store_true", help="add the students' model-card columns (latency, speed-up, memory, size)"
    )
    _add_launcher_options(table)
    table.set_defaults(handler=cmd_table)

    sweep = commands.add_parser("sweep", help="run the product of key=a,b,c overrides (Slurm job array or here)")
    sweep.add_argument("experiment", help="a name from `kdlab list experiments`, or a path to a YAML file")
    sweep.add_argument("overrides", nargs="*", help="dotted.key=a,b,c: the grid is the product of the values")
    sweep.add_argument("--name", default=None, help="sweep name (default: experiment and a hash of the grid)")
    sweep.add_argument("--wait", action="store_true", help="with slurm: wait for the jobs, showing the job table")
    _add_launcher_options(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    status = commands.add_parser("status", help="each cell of a sweep: pending/running/done/failed, with its log")
    status.add_argument("sweep", help="a sweep name (under <runs-dir>/sweeps/), its folder or its manifest.json")
    status.add_argument("--runs-dir", default="runs", help="runtime.runs_dir of the sweep")
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser("teacher-report", help="accuracy, calibration and agreement of teacher runs")
    report.add_argument("runs", nargs="+", type=Path, help="teacher run folders (runs/teachers/<hash>)")
    report.add_argument("--out", default="results", help="folder for the markdown and PNGs")
    report.add_argument("--data-root", default=None, help="data.root of the runs' dataset (never part of a run)")
    report.set_defaults(handler=cmd_teacher_report)

    cache = commands.add_parser(
        "cache", help="write a teacher run's outputs on the training split to a soft-label store"
    )
    cache.add_argument("run", type=Path, help="a finished teacher run folder (runs/teachers/<hash>)")
    cache.add_argument("overrides", nargs="*", help="data.key=value overrides of the teacher run's data config")
    cache.add_argument("--dataset", default=None, help="another dataset than the teacher's (same classes)")
    cache.add_argument("--data-root", default=None, help="data.root of the dataset (never part of a run)")
    cache.add_argument("--top-k", type=int, default=None, help="store the k largest logits (large class counts)")
    cache.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage type of logits")
    cache.add_argument("--out", type=Path, default=None, help="store folder (default: <runs>/stores/<key>)")
    cache.add_argument("--device", default="cpu", help="where the teacher runs (cpu, cuda)")
    cache.set_defaults(handler=cmd_cache)

    export = commands.add_parser(
        "export", help="write a finished run's student as ONNX or TorchScript (optionally int8), parity-checked"
    )
    export.add_argument("run", type=Path, help="a finished student run folder (runs/<experiment>/<hash>)")
    export.add_argument("--format", required=True, help="onnx or torchscript (`kdlab list export-formats`)")
    export.add_argument(
        "--int8",
        nargs="?",
        const="static",
        default=None,
        help="also write an int8 model: static (calibrated activations; the default) or dynamic",
    )
    export.add_argument("--data-root", default=None, help="data.root of the run's dataset (never part of a run)")
    export.add_argument(
        "--min-agreement", type=float, default=99.5, help="%% top-1 agreement a float file must reach (99.5)"
    )
    export.add_argument("--calibration-samples", type=int, default=512, help="training samples for static int8")
    export.set_defaults(handler=cmd_export)

    card = commands.add_parser("card", help="a student's model card: accuracy vs teacher, size, latency, memory")
    card.add_argument("run", type=Path, help="a finished student run folder (runs/<experiment>/<hash>)")
    card.add_argument("--data-root", default=None, help="data.root of the run's dataset (never part of a run)")
    card.add_argument("--runs", type=int, default=200, help="timed batch-1 calls per model (median kept)")
    card.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    card.add_argument("--threads", type=int, default=1, help="CPU threads for every model (1: one phone core)")
    card.set_defaults(handler=cmd_card)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (`kdlab table t --seeds 3 key=value`): collect the stragglers.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Tables are wide: when output goes to a file or CI log, do not wrap them at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not args.verbose:
        import lightning.pytorch  # noqa: F401 - it sets its own log level on import; override after

        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return args.handler(args, console)
    except KdlabError as error:
        print(f"kdlab: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
