"""GPU check (not CI): LM distillation throughput, a ~100M-parameter byte GPT teacher (gpt-100m) ->
~20M student (gpt-20m), forward KL, bf16, under DeepSpeed ZeRO-3 (and the other strategies);
prints tokens/s and peak GPU memory per strategy.

    python tests/gpu/lm_zero3_bench.py [--devices N] [--steps S] [--strategies deepspeed_stage_3,fsdp2,ddp]

Each strategy runs as its own ``--one STRATEGY`` process. Teachers are untrained: only the cost
matters. ``--dry-run`` plans every strategy on CPU without training (what a CPU machine can check).
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

from kdlab.catalog import load_lm_experiment
from kdlab.lm.pipeline import build_lm_system, plan_lm
from kdlab.training import fit_and_test

STRATEGIES = ("deepspeed_stage_3", "fsdp2", "ddp")
BATCH_PER_DEVICE = 16
BLOCK = 512


def overrides(runs: Path, strategy: str, devices: int, accelerator: str) -> list[str]:
    return [
        f"runtime.runs_dir={runs}",
        f"runtime.strategy={strategy}",
        f"runtime.devices={devices}",
        f"runtime.accelerator={accelerator}",
        "runtime.wandb=disabled",
        "runtime.progress=false",
        "teacher.model.preset=gpt-100m",
        "student.model.preset=gpt-20m",
        f"data.block_size={BLOCK}",
        f"data.batch_size={BATCH_PER_DEVICE * devices}",
        "data.options.max_train_bytes=4000000",
        "data.options.max_val_bytes=20000",
        "student.train.epochs=1",
        "student.train.precision=bf16-mixed",
    ]


class Throughput(L.Callback):
    """Target tokens per second after a warm-up of 5 steps, and rank 0's peak GPU memory."""

    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps, self.start, self.tokens = out, steps, 0.0, 0

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 5:
            torch.cuda.synchronize()
            self.start, self.tokens = time.perf_counter(), 0
        self.tokens += int((batch["labels"] != -100).sum()) * trainer.world_size

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if trainer.global_step < self.steps:
            return
        torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        if trainer.is_global_zero:
            peak = torch.cuda.max_memory_allocated() / 2**30
            self.out.write_text(json.dumps({"tokens_per_s": self.tokens / seconds, "peak_gib_rank0": peak}))
        trainer.should_stop = True


def run_one(strategy: str, devices: int, steps: int, out: Path) -> None:
    config = load_lm_experiment("lm-stdlib-kd", overrides(out.parent / "runs", strategy, devices, "gpu"))
    plan = plan_lm(config)
    system = build_lm_system(plan, config.distill, config.student.train, plan.student, plan.teacher, None)
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
        callbacks=[Throughput(out, steps)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=max(torch.cuda.device_count(), 1))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--one", help="run this strategy in this process (used by the driver)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="plan each strategy on CPU; train nothing")
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.devices, args.steps, Path(args.out))
        return
    work = Path(tempfile.mkdtemp(prefix="kdlab-lm-bench-"))
    for strategy in args.strategies.split(","):
        if args.dry_run:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            plan_lm(load_lm_experiment("lm-stdlib-kd", overrides(work, strategy, 1, "cpu")))
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
            f"{strategy:>18}: {result['tokens_per_s']:9.0f} tokens/s, peak {result['peak_gib_rank0']:.2f} GiB (rank 0)"
        )


if __name__ == "__main__":
    main()
