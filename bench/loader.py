"""Data loading against the KD training step: samples/s of kdlab's train loaders vs of the step.

For MNIST-1D (kdlab's data module, with the batch augmentation the recipe turns on, applied as
Lightning's ``on_after_batch_transfer`` does) and for CIFAR-shaped images through kdlab's real
CIFAR-100 data module reading files in the real python-pickle format (a small fake dataset written
to a temporary folder; the crop-and-flip augmentation of the recipe), the train loader's samples/s
with the recipe's ``num_workers`` and with 0, against the samples/s of that pair's KD step (the
kdlab system's loss terms, backward and optimiser step, teacher included, on the loader's batches).
Loader and step are timed interleaved, round by round; the median is kept.

    python bench/loader.py                               # both pairs, CPU
    python bench/loader.py --pairs mnist1d --rounds 3

The loader is timed alone (nothing trains meanwhile): loader/step says how many times faster
than the step it delivers batches. With 0 workers loading adds to every step, so the share of
the step spent loading is about 1 / (1 + ratio).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning
import numpy as np
import torch
from report import machine_line, markdown_table, rich_table
from rich.console import Console
from steps import Pair, one_step
from torch.utils.data import DataLoader
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import calculate_md5

from kdlab.catalog import load_experiment
from kdlab.pipeline import Plan, build_student_system, plan_experiment

PAIRS = {
    "mnist1d": Pair("mnist1d-kd", (), steps=20),
    "cifar100": Pair("crd-resnet32x4-resnet8x4", ("data.root={root}",), steps=1),
}


def write_fake_cifar100(root: Path, n_train: int, n_test: int) -> None:
    """``root/cifar-100-python`` with train, test and meta pickled as the real files are (a dict of
    ``data``: N x 3072 uint8 rows, CHW, and fine/coarse labels; pickle protocol 2)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        content = {
            "filenames": [f"img_{i:05d}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {"fine_label_names": [f"fine_{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def accept_fake_cifar100(root: Path) -> None:
    """torchvision checks each file against the official md5; for this process, expect these files'."""
    folder = root / CIFAR100.base_folder
    CIFAR100.train_list = [[name, calculate_md5(folder / name)] for name, _ in CIFAR100.train_list]
    CIFAR100.test_list = [[name, calculate_md5(folder / name)] for name, _ in CIFAR100.test_list]
    CIFAR100.meta = {**CIFAR100.meta, "md5": calculate_md5(folder / CIFAR100.meta["filename"])}


def build_plan(pair: Pair, root: Path, runs_dir: str, workers: int | None, batch: int | None) -> Plan:
    overrides = [o.format(root=root) for o in pair.overrides] + [f"runtime.runs_dir={runs_dir}"]
    if workers is not None:
        overrides.append(f"data.num_workers={workers}")
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
    plan = plan_experiment(load_experiment(pair.experiment, overrides))
    plan.datamodule.setup()
    return plan


def loader_timer(plan: Plan, batches: int | None) -> Callable[[], float]:
    """Samples/s of one pass over the train loader (persistent workers warmed by a first pass),
    each batch augmented as the trainer would after transfer."""
    datamodule = plan.datamodule
    loader: DataLoader = datamodule.train_dataloader()

    def one_pass() -> float:
        samples = 0
        started = time.perf_counter()
        for i, batch in enumerate(loader):
            samples += len(datamodule.augment_batch(batch)["target"])
            if batches is not None and i + 1 >= batches:
                break
        return samples / (time.perf_counter() - started)

    one_pass()
    return one_pass


def step_timer(plan: Plan, steps: int) -> Callable[[], float]:
    """Samples/s of the pair's KD step (kdlab's system, its optimiser) on the loader's batches."""
    system = build_student_system(plan, plan.teacher).train()
    optimizer = system.configure_optimizers()["optimizer"]
    loader = iter(plan.datamodule.train_dataloader())
    batches = [plan.datamodule.augment_batch(next(loader)) for _ in range(steps)]

    def run() -> float:
        seconds = sum(one_step(system, optimizer, batch) for batch in batches)
        return sum(len(b["target"]) for b in batches) / seconds

    run()
    return run


def measure(timers: dict[str, Callable[[], float]], rounds: int, label: str) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(rounds):
        for name, timer in timers.items():
            results[name].append(timer())
        print(f"{label}: round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in results.items()}


def pair_rows(name: str, pair: Pair, root: Path, runs_dir: str, args: argparse.Namespace) -> list[list[str]]:
    """One row per worker count: loader samples/s, step samples/s, their ratio."""
    plan = build_plan(pair, root, runs_dir, None, args.batch)
    torch.set_num_threads(plan.config.runtime.threads or os.cpu_count() or 1)
    recipe_workers = plan.datamodule.num_workers
    timers = {"step": step_timer(plan, args.steps or pair.steps)}
    for workers in dict.fromkeys((recipe_workers, 0)):
        loader_plan = plan if workers == recipe_workers else build_plan(pair, root, runs_dir, workers, args.batch)
        timers[f"loader, {workers} workers"] = loader_timer(loader_plan, args.batches)
    rates = measure(timers, args.rounds, name)
    step = rates.pop("step")
    batch = plan.datamodule.batch_size
    return [
        [
            name,
            f"{key.split(', ')[1]}" + (" (recipe)" if key.endswith(f" {recipe_workers} workers") else ""),
            str(batch),
            f"{rate:,.0f}",
            f"{step:,.0f}",
            f"{rate / step:.1f}",
        ]
        for key, rate in rates.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated: " + ", ".join(PAIRS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5000, help="fake CIFAR-100 training images")
    parser.add_argument("--batches", type=int, help="loader batches per pass (default: a whole epoch)")
    parser.add_argument("--steps", type=int, help="KD steps per round (default: the pair's own)")
    parser.add_argument("--batch", type=int, help="batch size (default: the recipe's)")
    args = parser.parse_args()
    table_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_fake_cifar100(root, args.samples, 100)
        accept_fake_cifar100(root)
        for name in args.pairs.split(","):
            torch.manual_seed(0)
            table_rows += pair_rows(name, PAIRS[name], root, str(Path(tmp) / "runs"), args)
    header = ("data", "workers", "batch", "loader samples/s", "KD step samples/s", "loader / step")
    title = "Train loader vs KD training step, samples/s (median of rounds)"
    Console(width=120).print(rich_table(title, header, table_rows, left=("data", "workers")))
    print(
        f"\n{args.rounds} rounds (median); fake CIFAR-100 of {args.samples} training images; "
        f"{machine_line(lightning)}\n"
    )
    print(markdown_table(header, table_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
