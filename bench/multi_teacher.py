"""Multi-teacher forward: same-architecture teachers as one vmap-ed call vs a Python loop.

For N = 1, 2, 4 teachers of one architecture, the time of the ensemble's forward (inference mode,
what every multi-teacher training step pays) both ways, interleaved round by round in one run; the
median of the rounds is kept. Outputs are checked equal before timing.

With ``--step``, also the whole multi-teacher KD training step (kdlab's ``multi_teacher`` scheme:
student and teachers' forwards, averaged soft labels, KD loss, backward, optimiser step) with
``scheme_params.vectorize`` true vs false, on the pair's own experiment (resnet32x4 -> resnet8x4
on CIFAR-shaped synthetic data; MNIST-1D CNN teachers -> thin CNN), same batch, interleaved.

    python bench/multi_teacher.py                       # resnet32x4 (CIFAR, batch 64) and MNIST-1D CNN
    python bench/multi_teacher.py --rounds 3 --teachers 1,2,4
    python bench/multi_teacher.py --step --rounds 3     # forwards, then training steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from report import machine_line, markdown_table, rich_table
from rich.console import Console
from steps import one_step

from kdlab.catalog import load_experiment
from kdlab.data.base import Batch
from kdlab.models import create_model
from kdlab.pipeline import build_student_system, plan_experiment
from kdlab.schemes import FrozenTeacher
from kdlab.schemes.ensemble import TeacherEnsemble

CASES = {"resnet32x4": ((64, 3, 32, 32), 100), "mnist1d_cnn": ((100, 40), 10)}
# The experiment whose multi-teacher KD step each teacher model is timed in, and steps per round.
STEP_CASES = {
    "resnet32x4": ("crd-resnet32x4-resnet8x4", ("data.name=synthetic", "data.kwargs.num_samples=256"), 1),
    "mnist1d_cnn": ("mnist1d-multi-teacher", (), 20),
}
StepSystem = tuple[torch.nn.Module, torch.optim.Optimizer]


def ensembles(model: str, count: int, classes: int) -> tuple[TeacherEnsemble, TeacherEnsemble]:
    teachers = []
    for seed in range(count):
        torch.manual_seed(seed)
        teachers.append(FrozenTeacher(create_model(model, num_classes=classes)))
    return TeacherEnsemble(teachers, (), vectorize=True), TeacherEnsemble(teachers, (), vectorize=False)


def timed(ensemble: TeacherEnsemble, inputs: torch.Tensor) -> float:
    started = time.perf_counter()
    ensemble(inputs)
    return time.perf_counter() - started


def step_systems(model: str, count: int, batch_size: int | None, runs_dir: str) -> tuple[dict[str, StepSystem], Batch]:
    """The multi-teacher KD system over ``count`` teachers, vectorised and looped, and one batch."""
    experiment, overrides, _ = STEP_CASES[model]
    common = [
        *overrides,
        "scheme=multi_teacher",
        f"teachers=[{','.join(['{}'] * count)}]",
        f"runtime.runs_dir={runs_dir}",
    ]
    if batch_size is not None:
        common.append(f"data.batch_size={batch_size}")
    systems = {}
    for vectorize in ("true", "false"):
        plan = plan_experiment(load_experiment(experiment, [*common, f"scheme_params.vectorize={vectorize}"]))
        torch.set_num_threads(plan.config.runtime.threads or os.cpu_count() or 1)
        system = build_student_system(plan, [t.model for t in plan.teachers]).train()
        systems["vmap" if vectorize == "true" else "loop"] = (system, system.configure_optimizers()["optimizer"])
    plan.datamodule.setup()
    return systems, next(iter(plan.datamodule.train_dataloader()))


def step_rows(model: str, counts: list[int], rounds: int, batch_size: int | None) -> list[list[str]]:
    """Median step (mean over the case's steps per round) of each N, vmap and loop interleaved."""
    steps = STEP_CASES[model][2]
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for count in counts:
            systems, batch = step_systems(model, count, batch_size, runs_dir)
            times: dict[str, list[float]] = {"loop": [], "vmap": []}
            for round_ in range(rounds + 1):  # the first round warms up
                for name in times:
                    seconds = sum(one_step(*systems[name], batch) for _ in range(steps)) / steps
                    if round_:
                        times[name].append(seconds)
            loop, vmap = statistics.median(times["loop"]), statistics.median(times["vmap"])
            size, threads = len(batch["target"]), torch.get_num_threads()
            label = f"{model} -> {STEP_CASES[model][0]}, batch {size}, {threads} thread{'s' * (threads > 1)}"
            rows.append([label, str(count), f"{1000 * loop:.1f}", f"{1000 * vmap:.1f}", f"{vmap / loop:.2f}"])
            print(f"{model} x{count} step done", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--teachers", default="1,2,4", help="teacher counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also time the whole multi-teacher KD training step")
    parser.add_argument("--step-batch", type=int, help="batch size of the step (default: the experiment's)")
    args = parser.parse_args()
    counts = [int(n) for n in args.teachers.split(",")]
    header = ("teachers", "N", "loop (ms)", "vmap (ms)", "vmap / loop")
    rows = []
    for model in args.models.split(","):
        shape, classes = CASES[model]
        inputs = torch.randn(*shape)
        for count in counts:
            fast, slow = ensembles(model, count, classes)
            for a, b in zip(fast(inputs), slow(inputs), strict=True):  # same outputs, then time
                torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {"vmap": [], "loop": []}
            for _ in range(args.rounds):
                times["loop"].append(timed(slow, inputs))
                times["vmap"].append(timed(fast, inputs))
            loop, vmap = statistics.median(times["loop"]), statistics.median(times["vmap"])
            rows.append([model, str(count), f"{1000 * loop:.1f}", f"{1000 * vmap:.1f}", f"{vmap / loop:.2f}"])
            print(f"{model} x{count} done", file=sys.stderr, flush=True)
    title = "Multi-teacher forward: vmap-ed vs loop (median of rounds)"
    Console().print(rich_table(title, header, rows, left=header[:1]))
    print(
        f"\n{args.rounds} rounds, input batch {', '.join(f'{m} {CASES[m][0]}' for m in args.models.split(','))}; "
        f"{torch.get_num_threads()} threads; {machine_line()}\n"
    )
    print(markdown_table(header, rows))
    if args.step:
        print_steps([row for m in args.models.split(",") for row in step_rows(m, counts, args.rounds, args.step_batch)])
    return 0


def print_steps(rows: list[list[str]]) -> None:
    header = ("teachers -> student experiment", "N", "loop step (ms)", "vmap step (ms)", "vmap / loop")
    title = "Multi-teacher KD training step: vectorize=true vs false (median of rounds)"
    Console(width=120).print(rich_table(title, header, rows, left=header[:1]))
    print()
    print(markdown_table(header, rows))


if __name__ == "__main__":
    sys.exit(main())
