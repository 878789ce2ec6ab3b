"""GPU check (not CI): 3 x resnet32x4 teachers -> resnet8x4, random CIFAR-shaped data, bf16, under
each strategy for a fixed number of steps; prints images/s and peak GPU memory per strategy.

    python tests/gpu/distributed_bench.py [--devices N] [--steps S] [--strategies ddp,fsdp2,...]

Each strategy runs as its own ``python tests/gpu/distributed_bench.py --one STRATEGY`` process (the
strategies launch their ranks by re-running that command line). ``--dry-run`` plans every strategy
on CPU without training: what this repository's CI-less machine can check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kdlab.catalog import load_experiment
from kdlab.pipeline import build_student_system, plan_experiment
from kdlab.training import fit_and_test

STRATEGIES = ("ddp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")
BATCH_PER_DEVICE = 128


def overrides(runs: Path, strategy: str, devices: int, steps: int, accelerator: str) -> list[str]:
    samples = steps * BATCH_PER_DEVICE * devices
    return [
        f"runtime.runs_dir={runs}",
        f"runtime.strategy={strategy}",
        f"runtime.devices={devices}",
        f"runtime.accelerator={accelerator}",
        "runtime.wandb=disabled",
        "runtime.progress=false",
        "scheme=multi_teacher",
        "teachers=[{},{},{}]",
        "method.name=kd",
        "data.name=synthetic",
        f"data.kwargs={{num_samples: {samples}, test_samples: 256, classes: 100}}",
        f"data.batch_size={BATCH_PER_DEVICE * devices}",
        "data.val_fraction=0",
        "data.augment=false",
        "teacher.model.name=resnet32x4",
        "teacher.calibration.method=none",
        "student.model.name=resnet8x4",
        "student.train.epochs=1",
        "student.train.precision=bf16-mixed",
    ]


class Throughput(L.Callback):
    """Images per second after a warm-up of 5 steps, and the peak GPU memory of this rank."""

    def __init__(self, out: Path) -> None:
        self.out, self.start, self.images = out, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 5:
            torch.cuda.synchronize()
            self.start, self.images = time.perf_counter(), 0
        self.images += batch["input"].shape[0] * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        peak = torch.cuda.max_memory_allocated() / 2**30
        if trainer.is_global_zero:
            self.out.write_text(json.dumps({"images_per_s": self.images / seconds, "peak_gib_rank0": peak}))


def run_one(strategy: str, devices: int, steps: int, out: Path) -> None:
    """One strategy on ``devices`` GPUs; teachers are untrained (only the cost matters)."""
    config = load_experiment("mnist1d-kd", overrides(out.parent / "runs", strategy, devices, steps, "gpu"))
    plan = plan_experiment(config)
    teachers = [t.model for t in plan.teachers]
    system = build_student_system(plan, teachers)
    plan.student_run.prepare()
    torch.cuda.reset_peak_memory_stats()
    fit_and_test(
        system,
        plan.datamodule,
        plan.student_run,
        config.student.train,
        config.runtime,
        0,
        "bench",
        "bench",
        test=False,
        callbacks=[Throughput(out)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=max(torch.cuda.device_count(), 1))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--one", help="run this strategy in this process (used by the driver)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="plan each strategy on CPU; train nothing")
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.devices, args.steps, Path(args.out))
        return
    work = Path(tempfile.mkdtemp(prefix="kdlab-bench-"))
    for strategy in args.strategies.split(","):
        if args.dry_run:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the check DeepSpeed on CPU asks for
            plan_experiment(load_experiment("mnist1d-kd", overrides(work, strategy, 1, 2, "cpu")))
            print(f"{strategy:>18}: planned (dry run)")
            continue
        out = work / f"{strategy}.json"
        command = [sys.executable, __file__, "--one", strategy, "--devices", str(args.devices)]
        done = subprocess.run([*command, "--steps", str(args.steps), "--out", str(out)], env=None)
        if done.returncode or not out.exists():
            print(f"{strategy:>18}: failed (exit {done.returncode})")
            continue
        result = json.loads(out.read_text())
        print(
            f"{strategy:>18}: {result['images_per_s']:9.0f} images/s, peak {result['peak_gib_rank0']:.2f} GiB (rank 0)"
        )


if __name__ == "__main__":
    main()
