"""Training-step time of every registered method as a ratio to the vanilla (CE-only) student step.

One step = student (and teacher) forward, every loss term, backward, optimiser step: what the
scheme does per batch, without Lightning's loop around it. All methods are timed in the same run,
interleaved round by round, so machine drift hits them alike; the median of the rounds is kept.

    python bench/method_step.py                      # resnet32x4 -> resnet8x4, batch 64, CPU
    python bench/method_step.py --methods kd,crd --rounds 3

Models are untrained and the data random (shapes are what costs time); CRD's memory bank holds
--samples entries instead of CIFAR-100's 50000, which does not change its per-step work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import lightning
import torch
from report import machine_line, markdown_table, rich_table
from rich.console import Console
from steps import one_step

from kdlab.catalog import load_experiment
from kdlab.methods import METHODS
from kdlab.pipeline import Plan, build_student_system, plan_experiment


def build(pair: str, method: str, batch: int, samples: int, runs_dir: str) -> Plan:
    overrides = [
        f"method.name={method}",
        "data.name=synthetic",
        f"data.kwargs.num_samples={samples}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        f"runtime.runs_dir={runs_dir}",
    ]
    return plan_experiment(load_experiment(pair, overrides))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="crd-resnet32x4-resnet8x4", help="a CIFAR-100 pair experiment")
    parser.add_argument("--methods", default=",".join(METHODS.names()), help="comma-separated method names")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    methods = ["ce", *(m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "ce")]
    torch.manual_seed(0)
    systems = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for method in methods:
            plan = build(args.pair, method, args.batch, args.samples, runs_dir)
            system = build_student_system(plan, plan.teacher).train()
            optimizer = system.configure_optimizers()["optimizer"]
            plan.datamodule.setup()
            systems[method] = (system, optimizer, next(iter(plan.datamodule.train_dataloader())))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for round_ in range(args.warmup + args.rounds):
        for method, (system, optimizer, batch) in systems.items():
            seconds = one_step(system, optimizer, batch)
            if round_ >= args.warmup:
                times[method].append(seconds)
        print(f"round {round_ + 1}/{args.warmup + args.rounds} done", file=sys.stderr, flush=True)

    base = statistics.median(times["ce"])
    header = ("method", "median step (ms)", "ratio to CE-only student")
    rows = []
    for method in methods:
        median = statistics.median(times[method])
        rows.append((method, f"{1000 * median:.0f}", f"{median / base:.2f}"))
    Console().print(rich_table(f"{args.pair}, batch {args.batch}: step time per method", header, rows, left=header[:1]))
    print(
        f"\n{args.pair}, batch {args.batch}, {args.rounds} timed rounds (median), {torch.get_num_threads()} threads; "
        f"{machine_line(lightning)}\n"
    )
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
