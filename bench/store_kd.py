"""KD from the soft-label store vs online KD vs the vanilla student: step time as ratios, one run.

    python bench/store_kd.py                      # resnet32x4 -> resnet8x4, batch 64, CPU
    python bench/store_kd.py --rounds 10 --samples 4096

Online KD runs the frozen teacher every step; store-fed KD looks its logits up by sample index
(memory-mapped fp16) and never builds it. The three systems are timed interleaved, round by round,
on the same batch (median kept). The script also writes stores of --samples samples and reports
their size per sample and write throughput: of the logits alone, and of `kdlab cache`'s whole
job (teacher forward + write). Models are untrained and the data random: only shapes cost time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning
import torch
from report import machine_line, markdown_table, rich_table
from rich.console import Console
from steps import one_step

from kdlab.cache import SoftLabelStore, write_store
from kdlab.catalog import load_experiment
from kdlab.pipeline import build_student_system, plan_experiment
from kdlab.schemes.teacher import StoreLookup


def write_stores(teacher: torch.nn.Module, inputs: torch.Tensor, classes: int, folder: Path) -> list[list[str]]:
    """Rows of (store kind, bytes/sample, logits-only samples/s and MB/s, teacher+write samples/s)."""
    with torch.no_grad():
        started = time.perf_counter()
        logits = torch.cat([teacher(chunk) for chunk in inputs.split(256)])
        forward_seconds = time.perf_counter() - started
    rows = []
    for label, top_k, dtype in (
        ("full fp16", None, "float16"),
        ("full fp32", None, "float32"),
        ("top-10 fp16", 10, "float16"),
    ):
        path = folder / label.replace(" ", "-")
        started = time.perf_counter()
        write_store(path, logits.split(256), len(logits), classes, {}, top_k, dtype)
        seconds = time.perf_counter() - started
        per_sample = SoftLabelStore(path).bytes_per_sample
        rows.append(
            [
                label,
                f"{per_sample:.0f}",
                f"{len(logits) / seconds:,.0f}",
                f"{per_sample * len(logits) / seconds / 1e6:.0f}",
                f"{len(logits) / (seconds + forward_seconds):,.0f}",
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="crd-resnet32x4-resnet8x4", help="a CIFAR-100 pair experiment")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per system first")
    parser.add_argument("--samples", type=int, default=2048, help="training samples (the store's size)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "data.name=synthetic",
            f"data.kwargs.num_samples={args.samples}",
            "data.val_fraction=0",
            f"data.batch_size={args.batch}",
            f"runtime.runs_dir={tmp}",
        ]
        plans = {m: plan_experiment(load_experiment(args.pair, [*overrides, f"method.name={m}"])) for m in ("ce", "kd")}
        kd_plan = plans["kd"]
        datamodule = kd_plan.datamodule
        datamodule.setup()
        inputs = torch.stack([datamodule.train_set[i]["input"] for i in range(len(datamodule.train_set))])
        teacher = kd_plan.teacher.eval()
        store_rows = write_stores(teacher, inputs, datamodule.num_classes, Path(tmp))
        store = SoftLabelStore(Path(tmp) / "full-fp16")
        batch = next(iter(datamodule.train_dataloader()))
        systems = {
            "vanilla student (CE)": build_student_system(plans["ce"], None),
            "online KD": build_student_system(kd_plan, teacher),
            "KD from the store": build_student_system(kd_plan, StoreLookup(store)),
        }
        optimizers = {name: s.train().configure_optimizers()["optimizer"] for name, s in systems.items()}
        times: dict[str, list[float]] = {name: [] for name in systems}
        for round_ in range(args.warmup + args.rounds):
            for name, system in systems.items():
                seconds = one_step(system, optimizers[name], batch)
                if round_ >= args.warmup:
                    times[name].append(seconds)
            print(f"round {round_ + 1}/{args.warmup + args.rounds} done", file=sys.stderr, flush=True)

    console = Console()
    base = statistics.median(times["vanilla student (CE)"])
    step_header = ("system", "median step (ms)", "ratio to vanilla student")
    step_rows = []
    for name, values in times.items():
        median = statistics.median(values)
        step_rows.append((name, f"{1000 * median:.0f}", f"{median / base:.2f}"))
    step_title = f"{args.pair}, batch {args.batch}: step time"
    console.print(rich_table(step_title, step_header, step_rows, left=step_header[:1]))
    store_header = ("store", "bytes/sample", "write samples/s (logits)", "write MB/s", "samples/s (teacher + write)")
    store_title = f"stores of {args.samples} samples x {datamodule.num_classes} classes"
    console.print(rich_table(store_title, store_header, store_rows, left=store_header[:1]))
    print(
        f"\n{args.pair}, batch {args.batch}, {args.rounds} timed rounds (median), {torch.get_num_threads()} threads; "
        f"{machine_line(lightning)}\n"
    )
    print(markdown_table(step_header, step_rows))
    print()
    print(markdown_table(store_header, store_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
