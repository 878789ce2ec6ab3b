"""Grid tables (`kdlab table` for a paper's table): loading errors, --dry-run, and rendering from
run folders that real tiny runs produced (the rendered numbers are recomputed here from each run's
metrics.json, not taken from hand-written values)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.errors import ConfigError, UnknownNameError
from kdlab.grid_render import _average_ranks, spearman
from kdlab.paper_tables import GridSpec, plan_grid
from kdlab.tables import find_table, load_table

TINY = ["teacher.train.epochs=2", "student.train.epochs=2", "runtime.wandb=disabled"]


def _table(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return str(path)


MINI = """scale: mini
paper: crd
paper_table: cifar100_same_arch
pairs:
  wide-thin: {experiment: mnist1d-crd-wide-thin, label: "wide -> thin"}
  cnn-mlp: mnist1d-crd-cnn-mlp
rows: [teacher, student, kd, {key: fitnet, label: "FitNet"}]
not_applicable:
  - {row: fitnet, pairs: [cnn-mlp], reason: "the MLP has one hidden stage"}
"""


@pytest.mark.slow
def test_mini_grid_renders_ours_ranks_and_the_papers_ranks_from_real_runs(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    table = _table(tmp_path, "tiny", MINI)
    code = main(["table", table, "--seeds", "2", "--out", str(out), f"runtime.runs_dir={runs}", *TINY])
    assert code == 0
    cells = json.loads((out / "tiny.json").read_text())["cells"]
    assert len(cells) == 2 * (4 * 2 - 1) and all(c["error"] is None for c in cells)
    # Every cell's value is its run's best-epoch test top-1 (the CRD paper's protocol), from its folder.
    for cell in cells:
        metrics = json.loads((Path(cell["run_dir"]) / "metrics.json").read_text())
        assert metrics["test/top1_best"] == cell["metrics"]["test/top1_best"]
        assert metrics["test/top1_best"] >= metrics["test/top1"] - 1e-4  # the last epoch is one of them
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    means: dict[tuple[str, str], float] = {}
    for row in rows:
        if row["status"] == "n/a":
            assert (row["row"], row["pair"]) == ("fitnet", "cnn-mlp")
            continue
        values = [c["metrics"]["test/top1_best"] for c in cells if (c["row"], c["pair"]) == (row["row"], row["pair"])]
        assert row["status"] == "done" and row["seeds_done"] == "2"
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["std"]) == pytest.approx(statistics.stdev(values))
        means[(row["row"], row["pair"])] = float(row["mean"])
    # Mean rank over the columns, recomputed: rank 1 = best of the non-teacher rows in a column.
    expected: dict[str, list[float]] = {}
    for pair in ("wide-thin", "cnn-mlp"):
        scores = {r: m for (r, p), m in means.items() if p == pair and r != "teacher"}
        for r in scores:
            expected.setdefault(r, []).append(
                1
                + sum(v > scores[r] for v in scores.values())
                + 0.5 * (sum(v == scores[r] for v in scores.values()) - 1)
            )
    markdown = (out / "tiny.md").read_text()
    checked = set()
    for line in markdown.splitlines():
        for key, label in (("kd", "KD"), ("fitnet", "FitNet"), ("student", "Student")):
            if line.startswith(f"| {label} |"):
                assert f"| {statistics.fmean(expected[key]):.1f} |" in line, line
                checked.add(key)
    assert checked == {"kd", "fitnet", "student"}
    assert "| wide -> thin |" in markdown and "Paper's mean rank" in markdown and "| n/a |" in markdown
    assert "Spearman's rho" in markdown and "n/a fitnet@cnn-mlp: the MLP has one hidden stage" in markdown
    assert "best-epoch test top-1" in markdown
    for png in ("tiny.png", "tiny-delta.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_full_scale_cells_sit_beside_the_published_numbers_and_bad_cells_do_not_stop_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = _table(
        tmp_path,
        "full",
        """scale: full
paper: crd
paper_table: cifar100_same_arch
pairs:
  resnet56-resnet20: mnist1d-crd-wide-thin   # a stand-in run, so the test stays tiny
  resnet110-resnet20: no-such-experiment
rows: [student, kd]
""",
    )
    out = tmp_path / "out"
    code = main(["table", table, "--seeds", "1", "--out", str(out), f"runtime.runs_dir={tmp_path / 'runs'}", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cell cannot run" in printed and "no-such-experiment" in printed
    rows = {(r["row"], r["pair"]): r for r in csv.DictReader((out / "full.csv").open())}
    kd = rows[("kd", "resnet56-resnet20")]
    assert float(kd["published"]) == 70.66  # CRD Table 1, KD, resnet56 -> resnet20
    assert float(kd["delta"]) == pytest.approx(float(kd["mean"]) - 70.66)
    assert rows[("kd", "resnet110-resnet20")]["status"] == "invalid"
    markdown = (out / "full.md").read_text()
    assert f"({70.66:.2f}, {float(kd['delta']):+.2f})" in markdown
    assert "invalid kd@resnet110-resnet20: UnknownNameError: unknown experiment 'no-such-experiment'" in markdown
    assert "Published but not in this table:" in markdown and "crd_kd@vgg13-vgg8" in markdown


def test_bad_grid_tables_name_the_bad_value(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown scale of table 'a' 'huge'"):
        load_table(_table(tmp_path, "a", MINI.replace("scale: mini", "scale: huge")))
    with pytest.raises(UnknownNameError, match="did you mean 'resnet56-resnet20'"):
        load_table(
            _table(tmp_path, "b", MINI.replace("scale: mini", "scale: full").replace("wide-thin", "resnet56-resnet2"))
        )
    with pytest.raises(ConfigError, match=r"row 'kdd' is not a registered method .*'kd'"):
        load_table(_table(tmp_path, "c", MINI.replace("student, kd,", "student, kdd,")))
    with pytest.raises(UnknownNameError, match="unknown paper_table of table 'd'"):
        load_table(_table(tmp_path, "d", MINI.replace("cifar100_same_arch", "cifar10")))
    spec = load_table(_table(tmp_path, "e", MINI))
    assert isinstance(spec, GridSpec)
    with pytest.raises(UnknownNameError, match=r"row of table 'e' \(--only\) 'crd'"):
        plan_grid(spec, [0], [], only=["crd"])
    with pytest.raises(ConfigError, match="table 'crd-mnist1d' is mini scale, not full"):
        find_table("crd-mnist1d", "full")
    with pytest.raises(ConfigError, match=r"paper 'crd' has 2 full-scale tables \(crd-cifar100, crd-cifar100-cross\)"):
        find_table("crd", "full")
    assert find_table("crd", "mini").name == "crd-mnist1d"


def test_dry_run_lists_every_cell_and_writes_the_resolved_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    code = main(
        ["table", "crd-mnist1d", "--dry-run", "--only", "kd,crd", "--out", str(tmp_path), f"runtime.runs_dir={runs}"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "0 of 18 cells finished" in printed and "kd@wide-thin" in printed and "not run" in printed
    plan = (tmp_path / "crd-mnist1d.plan.yaml").read_text()
    assert "crd@cnn-mlp/seed2:" in plan and "nce_k: 1024" in plan and "test_every_epoch: true" in plan
    assert not runs.exists()


def test_ranks_share_ties_and_spearman_matches_its_formula() -> None:
    assert _average_ranks({"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}) == {"a": 1.0, "b": 2.5, "c": 2.5, "d": 4.0}
    ours = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert spearman(ours, {"a": 1.5, "b": 2.5, "c": 3.5, "d": 9.0}) == (pytest.approx(1.0), 4)
    assert spearman(ours, {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}) == (pytest.approx(-1.0), 4)
    # 1 - 6 sum d^2 / (n (n^2 - 1)) with ranks (1,2,3,4) vs (2,1,4,3): d^2 = 4, n = 4 -> 0.6
    assert spearman(ours, {"a": 2.0, "b": 1.0, "c": 4.0, "d": 3.0})[0] == pytest.approx(0.6)
    assert spearman(ours, {"a": 1.0}) == (None, 1)
