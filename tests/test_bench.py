"""Every benchmark script runs end to end at its smallest size and prints its table with finite,
positive numbers, so the scripts cannot rot between the runs that fill bench/RESULTS.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, *args: str) -> str:
    command = [sys.executable, str(BENCH / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def markdown_rows(output: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table whose header begins with ``header_start``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    assert rows, f"empty table under {header_start!r}"
    return rows


def assert_positive(cells: list[str]) -> None:
    for cell in cells:
        value = float(cell.replace(",", "").rstrip("%"))
        assert math.isfinite(value) and value > 0, cells


@pytest.mark.slow
def test_overhead_prints_every_system_and_the_goals() -> None:
    args = ("--pairs", "mnist1d", "--rounds", "1", "--warmup", "0", "--steps", "2", "--batch", "4")
    out = run_bench("overhead.py", *args)
    rows = markdown_rows(out, "pair")
    assert {r[0] for r in rows} == {"mnist1d"}  # the CIFAR pair runs the same code, 40x slower
    systems = {r[1] for r in rows}
    assert {"bare PyTorch loop", "kdlab + Lightning", "torchdistill DistillationBox"} <= systems
    for row in rows:
        assert_positive([row[2], *row[4:]])  # row[3], the rounds' spread, is 0% over one round
    assert out.count("(goal <=") == 3


@pytest.mark.slow
def test_loader_compares_each_loader_with_the_step() -> None:
    args = ("--rounds", "1", "--samples", "64", "--batches", "2", "--steps", "1", "--batch", "8")
    rows = markdown_rows(run_bench("loader.py", *args), "data")
    assert [r[:2] for r in rows] == [
        ["mnist1d", "0 workers (recipe)"],
        ["cifar100", "8 workers (recipe)"],
        ["cifar100", "0 workers"],
    ]
    for row in rows:
        assert_positive(row[2:])


@pytest.mark.slow
def test_multi_teacher_times_forwards_and_training_steps() -> None:
    args = ("--models", "mnist1d_cnn", "--teachers", "1,2", "--rounds", "1", "--step", "--step-batch", "8")
    out = run_bench("multi_teacher.py", *args)
    for header in ("teachers | N", "teachers -> student experiment"):
        rows = markdown_rows(out, header)
        assert [r[1] for r in rows] == ["1", "2"]
        for row in rows:
            assert_positive(row[2:])


@pytest.mark.slow
def test_gpu_kd_step_dry_run_covers_the_grid_and_writes_json(tmp_path: Path) -> None:
    out_file = tmp_path / "gpu.json"
    args = ("--dry-run", "--batches", "2", "--teacher", "resnet8x4", "--out", str(out_file))  # a small teacher: quick
    out = run_bench("gpu_kd_step.py", *args)
    rows = markdown_rows(out, "batch")
    assert len(rows) == 8  # bf16 x channels_last x compile
    for row in rows:
        assert_positive(row[4:])
    payload = json.loads(out_file.read_text())
    assert payload["dry_run"] and len(payload["results"]) == 8 and payload["matmul_bf16_tflops"] > 0
