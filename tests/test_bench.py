"""Every benchmark script (all but ``steps`` and ``report``, which the others import) runs end to
end at its smallest size and prints its table with finite, positive numbers, so the scripts cannot
rot between the runs that fill bench/RESULTS.md."""

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


@pytest.mark.slow
def test_method_step_times_each_named_method_against_the_ce_student() -> None:
    args = ("--methods", "ce,kd,dkd", "--batch", "4", "--rounds", "1", "--warmup", "0", "--samples", "64")
    rows = markdown_rows(run_bench("method_step.py", *args), "method")
    assert [r[0] for r in rows] == ["ce", "kd", "dkd"]
    assert rows[0][2] == "1.00"  # the CE-only student is the unit
    for row in rows:
        assert_positive(row[1:])


@pytest.mark.slow
def test_store_kd_times_the_three_systems_and_sizes_the_stores() -> None:
    args = ("--batch", "4", "--rounds", "1", "--warmup", "0", "--samples", "64")
    out = run_bench("store_kd.py", *args)
    steps = markdown_rows(out, "system")
    assert [r[0] for r in steps] == ["vanilla student (CE)", "online KD", "KD from the store"]
    for row in steps:
        assert_positive(row[1:])
    stores = {r[0]: r for r in markdown_rows(out, "store")}
    assert set(stores) == {"full fp16", "full fp32", "top-10 fp16"}
    assert int(stores["full fp32"][1]) > int(stores["full fp16"][1]) > int(stores["top-10 fp16"][1]) > 0
    for row in stores.values():
        assert_positive([row[2], row[4]])  # MB/s rounds to 0 at 64 samples


@pytest.mark.slow
def test_lm_loss_memory_compares_the_chunked_loss_with_the_naive_one() -> None:
    args = ("--tokens", "64", "--vocab", "512", "--rounds", "1", "--repeats", "1")
    rows = markdown_rows(run_bench("lm_loss_memory.py", *args), "V")
    assert [r[0] for r in rows] == ["512"]
    assert_positive([rows[0][2], rows[0][3], rows[0][4], rows[0][7]])
    assert float(rows[0][8]) < 1e-4  # both forms compute the same loss
