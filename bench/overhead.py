"""Framework overhead of kdlab's KD training step, against a bare PyTorch loop, the floor and torchdistill.

For each teacher -> student pair, one KD step (teacher forward under no_grad, student forward,
CE + temperature-scaled KL, backward, optimiser step) is timed as:

- kdlab + Lightning: the system from ``build_student_system`` driven by the Trainer that
  ``kdlab.training.make_trainer`` builds for every run (CSV logger, W&B disabled, the run's
  checkpoint and seeding callbacks), progress bar off, and on (Rich, rendered to a fake terminal);
  a step is the time between two ``on_train_batch_start`` calls, so hooks, logging and the batch
  fetch are all in it; each round's first step (fresh Trainer and optimiser state) is not timed;
- kdlab system, plain loop: the same system's loss terms, weighted sum, backward and step;
- bare PyTorch loop: the same models (same initial weights), batches, loss and optimiser
  (type and hyperparameters read off the system's ``configure_optimizers``), written by hand;
- floor: the teacher's forward alone plus the student's forward/backward/step (CE) alone;
- torchdistill: its ``DistillationBox`` configured as its KD recipes are (``WeightedSumLoss``
  over ``KDLoss``, frozen teacher), ``forward_process`` + ``post_forward_process``.

All variants run over the same fixed list of pre-made batches, interleaved round by round in one
run (the order rotating each round); each round's value is the mean step over --steps steps, the
median over rounds is kept, and the interquartile range over the median shows the rounds' spread.

    python bench/overhead.py                             # both pairs, CPU
    python bench/overhead.py --pairs mnist1d --rounds 9 --profile 25
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import itertools
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import lightning
import torch
import torch.nn.functional as F
import torchdistill
from lightning.pytorch.callbacks import Callback
from report import machine_line, markdown_table, rich_table
from rich.console import Console
from steps import Pair, one_step
from torch import nn
from torchdistill.core.distillation import DistillationBox

from kdlab.catalog import load_experiment
from kdlab.loggers import make_loggers
from kdlab.losses import kd_loss
from kdlab.pipeline import Plan, build_student_system, plan_experiment
from kdlab.schemes import DistillationScheme
from kdlab.training import make_trainer, progress_bar, run_callbacks

Batch = dict[str, torch.Tensor]
Timer = Callable[[int], float]
ATTEMPTS = itertools.count(1)  # each Trainer fit logs to its own CSV folder, as a run's attempts do


PAIRS = {
    "resnet32x4-resnet8x4": Pair(
        "crd-resnet32x4-resnet8x4",
        ("data.name=synthetic", "data.kwargs.num_samples=256", "data.num_workers=0", "data.batch_size=64"),
        steps=1,
    ),
    "mnist1d": Pair("mnist1d-kd", (), steps=100),
}


@dataclass
class Setup:
    """One pair, built once: the kdlab system and plan, the batches, the KD weights."""

    plan: Plan
    system: DistillationScheme
    batches: list[Batch]
    temperature: float
    ce_weight: float
    kd_weight: float


def build_setup(pair: Pair, steps: int, batch: int | None, runs_dir: str) -> Setup:
    """The pair's plan and KD system (kdlab's own build), and enough pre-made batches for a round."""
    overrides = [*pair.overrides, "method.name=kd", f"runtime.runs_dir={runs_dir}", "runtime.wandb=disabled"]
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
    plan = plan_experiment(load_experiment(pair.experiment, overrides))
    torch.set_num_threads(plan.config.runtime.threads or os.cpu_count() or 1)
    system = build_student_system(plan, plan.teacher)
    plan.datamodule.setup()
    distinct = list(itertools.islice(plan.datamodule.train_dataloader(), steps + 2))
    batches = list(itertools.islice(itertools.cycle(distinct), steps + 2))
    temperature = float(system.method.temperature)
    return Setup(plan, system, batches, temperature, system.weights["ce"], system.weights["kd"])


def hyperparameters(group: dict) -> dict:
    """A parameter group's options, without its parameters or the scheduler's bookkeeping."""
    return {k: v for k, v in group.items() if k not in ("params", "initial_lr")}


def clone_optimizer(optimizer: torch.optim.Optimizer, source: nn.Module, target: nn.Module) -> torch.optim.Optimizer:
    """The same optimiser type and per-group hyperparameters over ``target``'s matching parameters."""
    names = {id(p): name for name, p in source.named_parameters()}
    params = dict(target.named_parameters())
    groups = [
        {**hyperparameters(group), "params": [params[names[id(p)]] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    return type(optimizer)(groups)


def student_optimizer(setup: Setup, student: nn.Module) -> torch.optim.Optimizer:
    """kdlab's optimiser for this system, rebuilt over a copy of the student."""
    return clone_optimizer(setup.system.configure_optimizers()["optimizer"], setup.system.student, student)


def fresh_models(setup: Setup) -> tuple[nn.Module, nn.Module]:
    """Copies of the teacher (eval, frozen) and the student with the system's initial weights."""
    teacher = copy.deepcopy(setup.system.teacher.model).eval().requires_grad_(False)
    return teacher, copy.deepcopy(setup.system.student).train()


def mean_step(step: Callable[[Batch], None], batches: list[Batch], steps: int) -> float:
    started = time.perf_counter()
    for batch in batches[:steps]:
        step(batch)
    return (time.perf_counter() - started) / steps


def kd_step_loss(setup: Setup, teacher: nn.Module, student: nn.Module, batch: Batch) -> torch.Tensor:
    """CE + temperature-scaled KL with kdlab's weights, written out."""
    with torch.no_grad():
        teacher_logits = teacher(batch["input"])
    logits = student(batch["input"])
    ce = F.cross_entropy(logits, batch["target"])
    return setup.ce_weight * ce + setup.kd_weight * kd_loss(logits, teacher_logits, setup.temperature)


def bare_loop(setup: Setup) -> Timer:
    """KD written by hand: what kdlab's step computes, with nothing around it."""
    teacher, student = fresh_models(setup)
    optimizer = student_optimizer(setup, student)

    def step(batch: Batch) -> None:
        loss = kd_step_loss(setup, teacher, student, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return lambda steps: mean_step(step, setup.batches, steps)


class BareModule(lightning.LightningModule):
    """The bare step inside Lightning, nothing else: what Lightning's own loop costs."""

    def __init__(self, setup: Setup) -> None:
        super().__init__()
        self.setup_ = setup
        self.teacher, self.student = fresh_models(setup)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return kd_step_loss(self.setup_, self.teacher, self.student, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return student_optimizer(self.setup_, self.student)


def bare_lightning(setup: Setup) -> Timer:
    """BareModule under a Trainer with no logger, checkpoint or bar."""
    module = BareModule(setup)

    def timed(steps: int) -> float:
        clock = StepClock()
        flags = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        trainer = lightning.Trainer(max_epochs=1, enable_model_summary=False, callbacks=[clock], **flags)
        trainer.fit(module, train_dataloaders=Batches(setup.batches[: steps + 2]))
        return clock.mean_step()

    return timed


def teacher_forward(setup: Setup) -> Timer:
    teacher, _ = fresh_models(setup)

    def step(batch: Batch) -> None:
        with torch.no_grad():
            teacher(batch["input"])

    return lambda steps: mean_step(step, setup.batches, steps)


def student_step(setup: Setup) -> Timer:
    """The student's supervised step alone (CE), the other half of the floor."""
    _, student = fresh_models(setup)
    optimizer = student_optimizer(setup, student)

    def step(batch: Batch) -> None:
        loss = F.cross_entropy(student(batch["input"]), batch["target"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return lambda steps: mean_step(step, setup.batches, steps)


def kdlab_plain(setup: Setup) -> Timer:
    """kdlab's system without Lightning: its loss terms, weighted sum, backward and step."""
    system = copy.deepcopy(setup.system).train()
    optimizer = system.configure_optimizers()["optimizer"]
    return lambda steps: sum(one_step(system, optimizer, b) for b in setup.batches[:steps]) / steps


class Batches:
    """Pre-made batches as one iterable (Lightning reads a bare list as a list of loaders)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StepClock(Callback):
    """Times from one training batch's start to the next: the whole per-step cycle of the loop."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())

    def mean_step(self) -> float:
        """Mean over every interval but the first (fresh Trainer, optimiser state created)."""
        return (self.starts[-1] - self.starts[1]) / (len(self.starts) - 2)


def kdlab_trainer(setup: Setup, progress: bool) -> Timer:
    """kdlab's system under the Trainer of every kdlab run, one fit of steps + 2 batches per round."""
    system = copy.deepcopy(setup.system)
    plan = setup.plan
    train = replace(plan.config.student.train, epochs=1)

    def timed(steps: int) -> float:
        clock = StepClock()
        callbacks: list[Callback] = [clock, *run_callbacks(plan.student_run, plan.config.seed)]
        if progress:  # what a user at a terminal sees: rendered to a fake one
            callbacks.append(progress_bar({"file": io.StringIO(), "force_terminal": True, "width": 120}))
        run = plan.student_run
        loggers = make_loggers(run.dir, plan.config.runtime, "bench", "student", run.spec, next(ATTEMPTS))
        trainer = make_trainer(train, plan.config.runtime, run.dir, loggers, callbacks, validate=False)
        trainer.fit(system, train_dataloaders=Batches(setup.batches[: steps + 2]))
        return clock.mean_step()

    return timed


def torchdistill_box(setup: Setup) -> Timer:
    """torchdistill's DistillationBox as its KD configs build it, on copies of the same models."""
    teacher, student = fresh_models(setup)
    reference = setup.system.configure_optimizers()["optimizer"]
    (group,) = reference.param_groups
    kd = {
        "student_module_path": ".",
        "student_module_io": "output",
        "teacher_module_path": ".",
        "teacher_module_io": "output",
        "temperature": setup.temperature,
        "alpha": setup.ce_weight,
        "beta": setup.kd_weight,
        "reduction": "batchmean",
    }
    config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": True},
        "optimizer": {"key": type(reference).__name__, "kwargs": hyperparameters(group)},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}},
        },
    }
    box = DistillationBox(teacher, student, {}, config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)

    def step(batch: Batch) -> None:
        loss = box.forward_process(batch["input"], batch["target"])
        box.post_forward_process(loss=loss)

    return lambda steps: mean_step(step, setup.batches, steps)


BARE, TEACHER, STUDENT, TRAINER = "bare PyTorch loop", "teacher forward", "student step (CE)", "kdlab + Lightning"
FLOOR, TORCHDISTILL = "floor (teacher fwd + student step)", "torchdistill DistillationBox"
LIGHTNING = "bare step in a minimal LightningModule"


def timers(setup: Setup, progress: bool) -> dict[str, Timer]:
    variants = {
        BARE: bare_loop(setup),
        TEACHER: teacher_forward(setup),
        STUDENT: student_step(setup),
        LIGHTNING: bare_lightning(setup),
        TRAINER: kdlab_trainer(setup, progress=False),
        "kdlab system, plain loop": kdlab_plain(setup),
        TORCHDISTILL: torchdistill_box(setup),
    }
    if progress:
        variants["kdlab + Lightning, progress bar"] = kdlab_trainer(setup, progress=True)
    return variants


def measure(variants: dict[str, Timer], steps: int, rounds: int, warmup: int, label: str) -> dict[str, list[float]]:
    """Each variant's mean step in every round, the variants interleaved; the order rotates by one
    each round, so no variant always runs first (after the last) on a noisy machine."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = variants[name](steps)
            if round_ >= warmup:
                times[name].append(seconds)
        print(f"{label}: round {round_ + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    times[FLOOR] = [t + s for t, s in zip(times[TEACHER], times[STUDENT], strict=True)]
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    found = {name: statistics.median(values) for name, values in times.items()}
    found[FLOOR] = found[TEACHER] + found[STUDENT]  # the sum of the parts' medians
    return found


def spread(values: list[float]) -> float:
    """Interquartile range over the median: how far the rounds disagree."""
    if len(values) < 2:
        return 0.0
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return (high - low) / statistics.median(values)


def profile_trainer(setup: Setup, steps: int, top: int) -> str:
    """cProfile's top entries (own time) over one Trainer fit of the pair: where per-step time goes."""
    timer = kdlab_trainer(setup, progress=False)
    timer(steps)  # imports and first-fit costs out of the profile
    profiler = cProfile.Profile()
    profiler.runcall(timer, steps)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


ORDER = (BARE, TRAINER, "kdlab + Lightning, progress bar", "kdlab system, plain loop", LIGHTNING, TORCHDISTILL)
ORDER += (FLOOR, TEACHER, STUDENT)


def milliseconds(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.2f}"


def rows(pair: str, times: dict[str, list[float]]) -> list[list[str]]:
    found = medians(times)
    bare, floor = found[BARE], found[FLOOR]
    return [
        [
            pair,
            name,
            milliseconds(found[name]),
            f"{100 * spread(times[name]):.0f}%",
            f"{found[name] / bare:.2f}",
            f"{found[name] / floor:.2f}",
        ]
        for name in ORDER
        if name in found
    ]


def goals(pair: str, medians: dict[str, float]) -> list[str]:
    """The issue's three targets, each with its measured ratio."""
    step = medians[TRAINER]
    checks = [
        ("kdlab step / bare loop", step / medians[BARE], 1.05),
        ("kdlab step / floor", step / medians[FLOOR], 1.05),
        ("kdlab step / torchdistill step", step / medians[TORCHDISTILL], 1.0),
    ]
    return [
        f"{pair}: {what} = {ratio:.2f} (goal <= {goal:.2f}): {'met' if ratio <= goal else 'MISSED'}"
        for what, ratio, goal in checks
    ]


def quiet() -> None:
    """Lightning's and torchdistill's per-fit banners and known warnings would bury the tables."""
    for name in ("lightning.pytorch", "lightning.fabric", "torchdistill"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps", type=int, help="steps per round (default: the pair's own)")
    parser.add_argument("--batch", type=int, help="batch size (default: the experiment's own)")
    parser.add_argument("--no-progress-bar", action="store_true", help="skip the progress-bar row")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N of a Trainer fit")
    args = parser.parse_args()
    quiet()
    table_rows, goal_lines, threads = [], [], []
    with tempfile.TemporaryDirectory() as runs_dir:
        for name in args.pairs.split(","):
            pair = PAIRS[name]
            steps = args.steps or pair.steps
            torch.manual_seed(0)
            setup = build_setup(pair, steps, args.batch, str(Path(runs_dir) / name))
            threads.append(f"{name}: batch {len(setup.batches[0]['target'])}, {torch.get_num_threads()} threads")
            times = measure(timers(setup, not args.no_progress_bar), steps, args.rounds, args.warmup, name)
            table_rows += rows(name, times)
            goal_lines += goals(name, medians(times))
            if args.profile:
                print(profile_trainer(setup, steps, args.profile))
    header = ("pair", "system", "median step (ms)", "IQR / median", "vs bare loop", "vs floor")
    title = "KD step: kdlab vs bare PyTorch, the floor and torchdistill (median of rounds)"
    Console(width=120).print(rich_table(title, header, table_rows, left=("pair", "system")))
    print("\n".join(goal_lines))
    print(f"\n{args.rounds} rounds (median); {'; '.join(threads)}; {machine_line(lightning, torchdistill)}\n")
    print(markdown_table(header, table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
