"""What a model costs on a CPU at batch 1: median latency, and peak memory in a fresh process.

Latency is timed here, in-process, on ``threads`` threads (1 by default: a phone or an edge box
gives an app one core, and one thread keeps the number stable on a shared machine). Peak memory
is what loading the model and running it at batch 1 adds to the resident memory of a process that
has imported its runtime already: the weights, the activations and the runtime's scratch space.
It is measured in a child process (``python -m kdlab.deploy.memory_probe``) so that nothing this
process holds counts, with Linux's peak-RSS counter reset just before loading.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_latency_ms(
    run: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, runs: int, warmup: int
) -> float:
    """Median wall time of ``runs`` calls on one input, after ``warmup`` untimed calls."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    for _ in range(warmup):
        run(example)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run(example)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def eager_runner(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(inputs)

    return run


def file_peak_memory_mb(kind: str, path: Path, example: torch.Tensor, threads: int = 1) -> float | None:
    """Peak resident memory (MiB) that loading the file ``path`` and one run on ``example`` add;
    ``kind``: ``torch`` (a pickled module), ``torchscript`` or ``onnx``. ``None`` where the OS
    cannot reset its peak-RSS counter."""
    with tempfile.TemporaryDirectory() as scratch:
        input_file = Path(scratch) / "input.pt"
        torch.save(example, input_file)
        command = [sys.executable, "-m", "kdlab.deploy.memory_probe", kind, str(path), str(input_file), str(threads)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def peak_memory_mb(model: nn.Module, example: torch.Tensor, threads: int = 1) -> float | None:
    """Peak resident memory (MiB) that loading ``model`` and one batch-1 forward add.

    The child unpickles the whole module (any architecture); a module that does not survive
    pickling (torch's int8 FX graphs) is measured as its TorchScript trace instead."""
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "model.pt"
        torch.save(model, model_file)
        try:
            return file_peak_memory_mb("torch", model_file, example, threads)
        except RuntimeError:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notices
                torch.jit.save(torch.jit.trace(model.eval(), example), str(model_file))
            return file_peak_memory_mb("torchscript", model_file, example, threads)
