"""`kdlab card`: the student's model card against its teacher, each number recomputed here from
the run folders; the latency median and the peak-memory probe on known inputs; `kdlab table
--card` columns; refusals for unfinished and language-model runs."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy_runs import mnist1d_kd_run
from torch import nn

from kdlab.deploy import latency
from kdlab.deploy.card import build_card, write_card
from kdlab.deploy.export import export_run
from kdlab.deploy.finished import NotFinishedError
from kdlab.errors import ConfigError
from kdlab.models import create_model

KDLAB = Path(sys.executable).parent / "kdlab"


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mnist1d_kd_run(tmp_path_factory.mktemp("runs")).student_run.dir


def saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def test_card_numbers_match_the_run_folders(kd_run: Path) -> None:
    export_run(kd_run, "onnx", "dynamic")
    card = build_card(kd_run, runs=30, warmup=3)
    metrics = write_card(card)
    student_metrics = json.loads((kd_run / "metrics.json").read_text())
    (teacher_run,) = (kd_run.parent.parent / "teachers").iterdir()
    teacher_metrics = json.loads((teacher_run / "metrics.json").read_text())
    student = create_model("mnist1d_mlp", num_classes=10)
    teacher = create_model("mnist1d_cnn", num_classes=10)
    assert metrics["card/params"] == sum(p.numel() for p in student.parameters()) == 15_210
    assert metrics["card/teacher_params"] == sum(p.numel() for p in teacher.parameters())
    assert metrics["card/size_bytes"] == saved_bytes(student)
    assert metrics["card/teacher_size_bytes"] == saved_bytes(teacher)
    assert metrics["card/teacher_top1"] == teacher_metrics["test/top1"]
    assert metrics["card/top1_gap"] == pytest.approx(student_metrics["test/top1"] - teacher_metrics["test/top1"])
    assert metrics["card/speedup"] == pytest.approx(metrics["card/teacher_latency_ms"] / metrics["card/latency_ms"])
    assert metrics["card/latency_ms"] > 0 and metrics["card/peak_memory_mb"] > 0
    onnx = kd_run / "export" / "student.onnx"
    assert metrics["card/student.onnx/size_bytes"] == onnx.stat().st_size
    assert metrics["card/student.int8-dynamic.onnx/latency_ms"] > 0
    # Written beside the run, merged into its metrics (the run stays finished and reusable).
    assert {k: v for k, v in student_metrics.items() if k.startswith("card/")} == metrics
    assert student_metrics["test/top1"] == card.student.top1
    markdown = (kd_run / "card.md").read_text()
    assert "| Top-1, test (%) |" in markdown and "x speed-up |" in markdown and "student.int8-dynamic.onnx" in markdown
    assert (kd_run / "card.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((kd_run / "card.json").read_text())["card/params"] == 15_210


def test_median_latency_times_every_call_and_keeps_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    # perf_counter pairs (start, end) of five timed calls: durations 5, 1, 3, 100, 2 ms.
    clock = iter([0, 0.005, 1, 1.001, 2, 2.003, 3, 3.1, 4, 4.002])
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock))
    result = latency.median_latency_ms(calls.append, torch.zeros(1), runs=5, warmup=2)
    assert len(calls) == 7 and result == pytest.approx(3.0)
    with pytest.raises(ValueError, match="runs must be >= 1"):
        latency.median_latency_ms(calls.append, torch.zeros(1), runs=0, warmup=0)


def test_peak_memory_grows_with_the_weights() -> None:
    """A 10.5M-parameter model (40 MiB of fp32 weights) against a 400-parameter one."""
    big = nn.Sequential(nn.Linear(3200, 3200), nn.ReLU(), nn.Linear(3200, 10))
    small = nn.Linear(40, 10)
    weights_mib = sum(p.numel() for p in big.parameters()) * 4 / 2**20
    big_peak = latency.peak_memory_mb(big, torch.zeros(1, 3200))
    small_peak = latency.peak_memory_mb(small, torch.zeros(1, 40))
    assert weights_mib <= big_peak < weights_mib + 40
    assert small_peak < 10


def test_card_refuses_unfinished_and_language_model_runs(kd_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "mnist1d-kd" / "unfinished"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text((kd_run / "config.yaml").read_text())
    with pytest.raises(NotFinishedError, match=rf"run {run} has not finished \(state: new\)"):
        build_card(run)
    lm = tmp_path / "lm-stdlib-kd" / "abc"
    lm.mkdir(parents=True)
    (lm / "config.yaml").write_text("stage: lm-student\n")
    with pytest.raises(ConfigError, match="is a language-model run: its student is saved for from_pretrained"):
        build_card(lm)
    with pytest.raises(ConfigError, match="--runs and --threads must be >= 1"):
        build_card(kd_run, runs=0)


@pytest.mark.slow
def test_table_card_adds_the_columns(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "results"
    tiny = ["teacher.train.epochs=1", "student.train.epochs=1", "runtime.wandb=disabled", "runtime.progress=false"]
    command = [str(KDLAB), "table", "mnist1d-kd", "--seeds", "1", "--card", "--out", str(out)]
    result = subprocess.run([*command, f"runtime.runs_dir={runs}", *tiny], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cells = {c["label"]: c for c in json.loads((out / "mnist1d-kd.json").read_text())["cells"]}
    rows = {r["label"]: r for r in csv.DictReader((out / "mnist1d-kd.csv").open())}
    kd = cells["Student: MLP, KD (T=1)"]
    card = json.loads((Path(kd["run_dir"]) / "card.json").read_text())
    assert kd["metrics"]["card/speedup"] == card["card/speedup"]
    assert float(rows["Student: MLP, KD (T=1)"]["latency_ms_mean"]) == pytest.approx(card["card/latency_ms"])
    assert float(rows["Student: MLP, KD (T=1)"]["speedup_mean"]) == pytest.approx(card["card/speedup"])
    assert not rows["Student: MLP, CE only"]["speedup_mean"]  # no teacher, no speed-up
    assert not rows["Teacher: CNN"]["latency_ms_mean"]  # cards are the students'
    header = (out / "mnist1d-kd.md").read_text().splitlines()[2]
    assert "Latency, batch 1 (ms)" in header and "Speed-up vs teacher" in header
