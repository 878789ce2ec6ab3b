"""KD training step on one GPU: images/s and achieved TFLOP/s against the card's bf16 matmul rate.

resnet32x4 -> resnet8x4 (kdlab's CIFAR-100 pair, KD at T=4, CE 0.1 + KD 0.9, the recipe's SGD),
kdlab's own system (``build_student_system``: frozen teacher under no_grad, the method's terms,
weighted sum) without Lightning's loop, at batch 256 and 1024, every combination of bf16 autocast,
channels_last and ``torch.compile`` (teacher and student compiled). FLOPs of one step are counted
once per batch size with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward
convolutions and matmuls); the reference rate is a large bf16 matmul timed first on the same card.
Prints one table and a markdown table, and writes every number to ``--out`` (JSON).

    python bench/gpu_kd_step.py --out gpu_kd_step.json            # on an H100/H200: a few minutes
    python bench/gpu_kd_step.py --dry-run --out /tmp/dry.json      # CPU, tiny batches, in seconds

Not run in CI: there is no GPU there. ``--dry-run`` runs the whole grid on CPU with 8x8 images at
batch 2 and 4 and ``torch.compile``'s eager backend, so the script itself is checked everywhere.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from report import markdown_table, rich_table
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from kdlab.catalog import load_experiment
from kdlab.data.base import Batch
from kdlab.pipeline import build_student_system, plan_experiment
from kdlab.schemes import DistillationScheme

EXPERIMENT = "crd-resnet32x4-resnet8x4"


@dataclass(frozen=True)
class Config:
    batch: int
    bf16: bool
    channels_last: bool
    compiled: bool


@dataclass
class Result:
    batch: int
    bf16: bool
    channels_last: bool
    compiled: bool
    step_ms: float
    images_per_s: float
    tflops: float
    fraction_of_matmul_peak: float


def build_system(runs_dir: str, teacher: str) -> DistillationScheme:
    """kdlab's KD system for the pair (untrained teacher: only shapes cost time)."""
    overrides = ["data.name=synthetic", "data.kwargs.num_samples=64", f"runtime.runs_dir={runs_dir}"]
    overrides.append(f"teacher.model.name={teacher}")
    plan = plan_experiment(load_experiment(EXPERIMENT, [*overrides, "method.name=kd"]))
    return build_student_system(plan, plan.teacher)


def prepare(base: DistillationScheme, config: Config, device: torch.device, backend: str) -> DistillationScheme:
    """A copy of the system on ``device`` in the config's memory format, teacher and student compiled if asked."""
    system = copy.deepcopy(base).to(device).train()
    if config.channels_last:
        system = system.to(memory_format=torch.channels_last)
    if config.compiled:
        system.student = torch.compile(system.student, backend=backend)
        teacher = system.teachers[0]
        teacher.model = torch.compile(teacher.model, backend=backend)
    return system


def make_batch(config: Config, device: torch.device, size: int = 32) -> Batch:
    inputs = torch.randn(config.batch, 3, size, size, device=device)
    if config.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (config.batch,), device=device)
    return {"input": inputs, "target": target, "index": torch.arange(config.batch, device=device)}


def kd_step(system: DistillationScheme, optimizer: torch.optim.Optimizer, batch: Batch, bf16: bool) -> None:
    """What kdlab's training step computes (Lightning's bf16-mixed autocasts the same region)."""
    device_type = batch["input"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = system.weighted_sum(system.loss_terms(batch))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, size: int, repeats: int) -> float:
    """Dense bf16 matmul rate of this device: the roofline the KD step is measured against."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def step_flops(base: DistillationScheme, batch_size: int, device: torch.device, size: int) -> int:
    """FLOPs of one eager fp32 step (the count does not depend on precision, layout or compile)."""
    config = Config(batch_size, bf16=False, channels_last=False, compiled=False)
    system = prepare(base, config, device, "eager")
    optimizer = system.configure_optimizers()["optimizer"]
    counter = FlopCounterMode(display=False)
    with counter:
        kd_step(system, optimizer, make_batch(config, device, size), bf16=False)
    return counter.get_total_flops()


def time_config(base: DistillationScheme, config: Config, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds per step after ``args.warmup`` steps (compilation happens there)."""
    system = prepare(base, config, device, args.backend)
    optimizer = system.configure_optimizers()["optimizer"]
    batch = make_batch(config, device, args.image_size)
    for _ in range(args.warmup):
        kd_step(system, optimizer, batch, config.bf16)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        kd_step(system, optimizer, batch, config.bf16)
    synchronize(device)
    return (time.perf_counter() - started) / args.steps


def run_grid(args: argparse.Namespace, device: torch.device, peak: float) -> tuple[list[Result], dict[int, int]]:
    with tempfile.TemporaryDirectory() as runs_dir:
        base = build_system(runs_dir, args.teacher)
    flops = {batch: step_flops(base, batch, device, args.image_size) for batch in args.batches}
    results = []
    for batch, bf16, channels_last, compiled in itertools.product(args.batches, *[(False, True)] * 3):
        config = Config(batch, bf16, channels_last, compiled)
        started = time.perf_counter()
        seconds = time_config(base, config, device, args)
        tflops = flops[batch] / seconds / 1e12
        results.append(Result(**asdict(config), step_ms=1000 * seconds, images_per_s=batch / seconds,
                              tflops=tflops, fraction_of_matmul_peak=tflops / peak))  # fmt: skip
        print(f"{config} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return results, flops


def figure(value: float) -> str:
    """Three significant digits (thousands separated), so tiny dry-run figures are not printed as 0."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def report(results: list[Result], flops: dict[int, int], peak: float, device_name: str, teacher: str) -> None:
    header = ("batch", "bf16", "channels_last", "compile", "step (ms)", "images/s", "TFLOP/s", "of matmul peak")
    rows = [
        [
            str(r.batch),
            "on" if r.bf16 else "off",
            "on" if r.channels_last else "off",
            "on" if r.compiled else "off",
            figure(r.step_ms),
            figure(r.images_per_s),
            figure(r.tflops),
            f"{figure(100 * r.fraction_of_matmul_peak)}%",
        ]
        for r in results
    ]
    title = f"{teacher} -> resnet8x4 KD step on {device_name}; bf16 matmul peak {peak:.1f} TFLOP/s"
    Console(width=140).print(rich_table(title, header, rows))
    per_step = ", ".join(f"batch {b}: {f / 1e12:.3f} TFLOP" for b, f in flops.items())
    print(f"\nFLOPs per step (FlopCounterMode, forward + backward): {per_step}\n")
    print(markdown_table(header, rows))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for every number")
    parser.add_argument("--dry-run", action="store_true", help="CPU, 8x8 images, batch 2 and 4, eager backend")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], help="default: 256,1024")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per config (compilation)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per config")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--image-size", type=int, default=32, help="CIFAR's 32; the models pool globally")
    parser.add_argument("--teacher", default="resnet32x4", help="teacher model (a smaller one for quick checks)")
    args = parser.parse_args()
    if args.dry_run:
        args.batches, args.warmup, args.steps, args.backend = args.batches or [2, 4], 1, 1, "eager"
        args.matmul_size, args.image_size = 256, 8
    args.batches = args.batches or [256, 1024]
    return args


def main() -> int:
    args = parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --dry-run", file=sys.stderr)
        return 2
    # Teacher and student share a forward (one code object): every config's graphs must fit the cache.
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine() + " CPU"
    started = time.perf_counter()
    peak = matmul_tflops(device, args.matmul_size, 5 if args.dry_run else 50)
    results, flops = run_grid(args, device, peak)
    report(results, flops, peak, device_name, args.teacher)
    payload = {
        "device": device_name,
        "pair": f"{args.teacher} -> resnet8x4",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "dry_run": args.dry_run,
        "matmul_bf16_tflops": peak,
        "flops_per_step": {str(b): f for b, f in flops.items()},
        "results": [asdict(r) for r in results],
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out} ({payload['wall_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
