"""`kdlab table`: every cell runs once per seed, renders beside the paper, failures stay visible."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.errors import ConfigError, UnknownNameError
from kdlab.tables import load_table, plan_table

FAST = ["teacher.train.epochs=2", "student.train.epochs=2", "runtime.wandb=disabled"]


@pytest.mark.slow
def test_table_renders_markdown_csv_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    code = main(
        ["table", "mnist1d-kd", "--seeds", "2", "--out", str(out), f"runtime.runs_dir={tmp_path / 'runs'}", *FAST]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Hinton KD on MNIST-1D" in printed and "Seeds 0, 1" in printed
    markdown = (out / "mnist1d-kd.md").read_text()
    for label in ("Teacher: CNN", "Logistic regression", "Student: MLP, CE only", "Student: MLP, KD (T=1)"):
        assert label in markdown
    assert "| 94 |" in markdown and "| 68 |" in markdown and "| 32 |" in markdown  # the paper's numbers
    assert "torch" in markdown and "| Epochs |" in markdown
    assert "This invocation took" in markdown and "runs trained for" in markdown
    assert "the paper trained on all 4000 without augmentation" in markdown  # the table's notes
    rows = {r["label"]: r for r in csv.DictReader((out / "mnist1d-kd.csv").open())}
    assert rows["Teacher: CNN"]["seeds_done"] == "2" and float(rows["Teacher: CNN"]["published_top1"]) == 94
    cells = json.loads((out / "mnist1d-kd.json").read_text())["cells"]
    assert len(cells) == 8 and all(c["error"] is None for c in cells)
    kd = [c["metrics"]["test/top1"] for c in cells if c["label"].startswith("Student: MLP, KD")]
    mean = sum(kd) / len(kd)
    assert float(rows["Student: MLP, KD (T=1)"]["top1_mean"]) == pytest.approx(mean)
    assert (out / "mnist1d-kd.png").read_bytes()[:4] == b"\x89PNG"
    # Teacher rows reuse the teacher that the KD rows trained: one teacher per seed.
    assert len(list((tmp_path / "runs" / "teachers").iterdir())) == 2


@pytest.mark.slow
def test_a_failed_cell_shows_as_failed_and_the_rest_renders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    diverge = "student.train.optimizer.lr=1e30"  # students diverge; the teacher row trains normally
    code = main(
        ["table", "mnist1d-kd", "--seeds", "1", "--out", str(out), f"runtime.runs_dir={tmp_path}", *FAST, diverge]
    )
    assert code == 1
    assert "cell failed" in capsys.readouterr().out
    cells = {c["label"]: c for c in json.loads((out / "mnist1d-kd.json").read_text())["cells"]}
    assert cells["Teacher: CNN"]["error"] is None and cells["Teacher: CNN"]["metrics"]["test/top1"] > 0
    failed = cells["Student: MLP, KD (T=1)"]
    assert "non-finite loss" in failed["error"]
    status = json.loads((Path(failed["run_dir"]) / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite loss" in status["error"]
    markdown = (out / "mnist1d-kd.md").read_text()
    assert "Student: MLP, KD (T=1) (1 failed: see" in markdown and "| failed |" in markdown


def test_bad_tables_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown table"):
        load_table("nope")
    bad_column = tmp_path / "t.yaml"
    bad_column.write_text("columns: [top1, speed]\nrows: [{label: a, experiment: mnist1d-ce}]\n")
    with pytest.raises(UnknownNameError, match="unknown column of table 't' 'speed'"):
        load_table(str(bad_column))
    bad_number = tmp_path / "u.yaml"
    bad_number.write_text("paper: mnist1d\nrows: [{label: a, experiment: mnist1d-ce, published: mlpp}]\n")
    with pytest.raises(UnknownNameError, match="did you mean 'mlp'"):
        load_table(str(bad_number))
    no_teacher = tmp_path / "v.yaml"
    no_teacher.write_text("rows: [{label: a, experiment: mnist1d-ce, stage: teacher}]\n")
    with pytest.raises(ConfigError, match="row 'a': method 'ce' has no teacher"):
        plan_table(load_table(str(no_teacher)), [0], [f"runtime.runs_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_only_keeps_the_named_methods_rows_and_names_a_bad_one(tmp_path: Path) -> None:
    spec = load_table("mnist1d-kd")
    runs = [f"runtime.runs_dir={tmp_path / 'runs'}"]
    kept = plan_table(spec, [0, 1], runs, only=["kd", "teacher"])
    assert {(c.row.stage, p.config.method.name) for c, p in kept} == {("teacher", "kd"), ("student", "kd")}
    assert len(kept) == 4
    with pytest.raises(UnknownNameError, match="unknown method of table 'mnist1d-kd' \\(--only\\) 'kdd'"):
        plan_table(spec, [0], runs, only=["kdd"])
