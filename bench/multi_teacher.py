"""Multi-teacher forward: same-architecture teachers as one vmap-ed call vs a Python loop.

For N = 1, 2, 4 teachers of one architecture, the time of the ensemble's forward (inference mode,
what every multi-teacher training step pays) both ways, interleaved round by round in one run; the
median of the rounds is kept. Outputs are checked equal before timing.

    python bench/multi_teacher.py                       # resnet32x4 (CIFAR, batch 64) and MNIST-1D CNN
    python bench/multi_teacher.py --rounds 3 --teachers 1,2,4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from kdlab.models import create_model
from kdlab.schemes import FrozenTeacher
from kdlab.schemes.ensemble import TeacherEnsemble

CASES = {"resnet32x4": ((64, 3, 32, 32), 100), "mnist1d_cnn": ((100, 40), 10)}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--teachers", default="1,2,4", help="teacher counts")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    counts = [int(n) for n in args.teachers.split(",")]
    table = Table(title="Multi-teacher forward: vmap-ed vs loop (median of rounds)")
    for column in ("teachers", "N", "loop (ms)", "vmap (ms)", "vmap / loop"):
        table.add_column(column, justify="left" if column == "teachers" else "right")
    lines = ["| teachers | N | loop (ms) | vmap (ms) | vmap / loop |", "|---|---|---|---|---|"]
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
            row = [model, str(count), f"{1000 * loop:.1f}", f"{1000 * vmap:.1f}", f"{vmap / loop:.2f}"]
            table.add_row(*row)
            lines.append("| " + " | ".join(row) + " |")
            print(f"{model} x{count} done", file=sys.stderr, flush=True)
    Console().print(table)
    print(
        f"\n{args.rounds} rounds, input batch {', '.join(f'{m} {CASES[m][0]}' for m in args.models.split(','))}; "
        f"{torch.get_num_threads()} threads; {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
