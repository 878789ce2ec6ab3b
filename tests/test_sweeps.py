"""Sweeps without a cluster: the grid, bad input refused before anything is submitted, the local
launcher, and `kdlab status` reading a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.errors import ConfigError, KdlabError
from kdlab.launch import parse_time
from kdlab.sweeps import parse_grid, plan_cells, split_values

FAST = ["teacher.train.epochs=2", "student.train.epochs=2", "runtime.wandb=disabled", "runtime.progress=false"]


def test_the_grid_is_the_product_of_the_values() -> None:
    grid = parse_grid(["method.params.temperature=1,4", "seed=0,1,2", "student.train.epochs=3"])
    assert len(grid) == 6
    assert grid[0] == ["method.params.temperature=1", "seed=0", "student.train.epochs=3"]
    assert grid[-1] == ["method.params.temperature=4", "seed=2", "student.train.epochs=3"]
    assert parse_grid([]) == [[]]  # no grid: the experiment itself, one cell
    assert split_values("[{},{}],[{}]") == ["[{},{}]", "[{}]"]  # commas inside brackets stay
    assert split_values("'a,b',c") == ["'a,b'", "c"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["seed="], "sweep key 'seed' has an empty value in 'seed='"),
        (["seed=0,,1"], "sweep key 'seed' has an empty value"),
        (["seed"], "sweep argument 'seed' is not key=value"),
        (["=1"], "sweep argument '=1' is not key=value"),
        (["seed=0", "seed=1"], "sweep key 'seed' is given twice"),
        (["seed=0,0"], "sweep key 'seed' repeats a value"),
    ],
)
def test_bad_grids_are_one_line_errors(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_an_unknown_key_or_value_fails_at_planning(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sweep cell studnet.train.epochs=1 runtime.runs_dir=.*studnet"):
        plan_cells("mnist1d-kd", parse_grid(["studnet.train.epochs=1", f"runtime.runs_dir={tmp_path}"]), "t")
    with pytest.raises(ConfigError, match=r"sweep cell method.params.temprature=1: .*did you mean 'temperature'"):
        plan_cells("mnist1d-kd", parse_grid(["method.params.temprature=1,2", f"runtime.runs_dir={tmp_path}"]), "t")
    with pytest.raises(KdlabError, match=r"sweep cell method.name=kdd: unknown method 'kdd'; did you mean 'kd'"):
        plan_cells("mnist1d-kd", parse_grid(["method.name=kd,kdd", f"runtime.runs_dir={tmp_path}"]), "t")
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


@pytest.mark.parametrize(
    ("text", "minutes"), [("90", 90), ("30:30", 31), ("1:30:00", 90), ("2-0", 2880), ("1-02:03:00", 1563)]
)
def test_slurm_times(text: str, minutes: int) -> None:
    assert parse_time(text) == minutes


def test_bad_launcher_options_fail_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = f"runtime.runs_dir={tmp_path}"
    assert main(["sweep", "mnist1d-kd", "seed=0,1", runs, "--partition", "gpu"]) == 2
    assert "--partition only apply to --launcher slurm (got --launcher local)" in capsys.readouterr().err
    assert main(["sweep", "mnist1d-kd", "seed=0,1", runs, "--launcher", "slurm", "--time", "soon"]) == 2
    assert "--time 'soon' is not a Slurm time" in capsys.readouterr().err
    assert main(["sweep", "mnist1d-kd", "seed=0,1", runs, "--launcher", "slurm", "--nodes", "0"]) == 2
    assert "--nodes must be at least 1, got 0" in capsys.readouterr().err
    assert main(["table", "mnist1d-kd", runs, "--gpus-per-node", "1"]) == 2
    assert "--gpus-per-node only apply to --launcher slurm" in capsys.readouterr().err
    assert main(["status", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown sweep 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_local_sweep_runs_each_cell_once_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two cells here, one of them diverging: it is reported as failed with its error; a second
    invocation skips the finished cell."""
    command = ["sweep", "mnist1d-kd", "student.train.optimizer.lr=0.01,1e30", f"runtime.runs_dir={tmp_path}", *FAST]
    assert main([*command, "--name", "lr"]) == 1
    printed = capsys.readouterr().out
    assert "1 done, 1 failed" in printed and "non-finite loss" in printed
    manifest = json.loads((tmp_path / "sweeps" / "lr" / "manifest.json").read_text())
    assert manifest["launcher"] == "local" and len(manifest["cells"]) == 2
    assert [c["label"] for c in manifest["cells"]] == [
        "student.train.optimizer.lr=0.01",
        "student.train.optimizer.lr=1e30",
    ]
    assert main(["status", "lr", "--runs-dir", str(tmp_path)]) == 0
    assert "1 done, 1 failed" in capsys.readouterr().out
    assert main([*command, "--name", "lr"]) == 1
    assert printed.count("cell 1/2") == 1 and "cell 1/2" not in capsys.readouterr().out  # done: skipped


def test_sweep_cells_share_a_wandb_group_with_their_swept_keys(tmp_path: Path) -> None:
    grid = parse_grid(["method.params.temperature=1,4", "seed=0,1", f"runtime.runs_dir={tmp_path}"])
    planned = plan_cells("mnist1d-kd", grid, "temps")
    assert len({cell.run_dir for cell, _ in planned}) == 4
    for (_, config), overrides in zip(planned, grid, strict=True):
        runtime = config.runtime
        assert runtime.wandb_group == "sweep/temps" and "sweep:temps" in runtime.wandb_tags
        temperature, seed = (float(o.split("=")[1]) for o in overrides[:2])
        assert runtime.wandb_sweep == {"method.params.temperature": temperature, "seed": seed}
