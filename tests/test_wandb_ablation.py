"""W&B for ablations, end to end: a tiny `kdlab table` with no W&B login writes offline runs that
share the table's group, carry job type, tags and the swept keys as top-level config, and a
``table`` run holding the rendered comparison table and its PNG. W&B failures (at start-up, or the
W&B service dying mid-run) leave training and the table's files intact, with a warning."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from wandb_records import config, find_wandb_files, history, read_records, run_info

from kdlab.catalog import load_experiment
from kdlab.config import RuntimeConfig
from kdlab.planning import plan_experiment
from kdlab.tables import Cell, TableResult, load_table, write_outputs
from kdlab.wandb_ablation import ablation_runtime, swept_values

KDLAB = Path(sys.executable).parent / "kdlab"
TABLE = """
title: "KD temperature ablation"
paper: mnist1d
seeds: 1
columns: [top1, params]
rows:
  - {label: "Teacher: CNN", experiment: mnist1d-kd, stage: teacher, published: cnn}
  - {label: "KD, T=2", experiment: mnist1d-kd, overrides: [method.params.temperature=2]}
  - {label: "KD, T=4, 50 hidden", experiment: mnist1d-kd,
     overrides: [method.params.temperature=4, "student.model.kwargs={hidden: 50}"]}
"""
FAST = ["teacher.train.epochs=1", "student.train.epochs=1", "runtime.threads=1", "runtime.progress=false"]
STUDENT_TAGS = {"stage:student", "dataset:mnist1d", "scheme:offline", "method:kd", "table:abl"}


def kdlab(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The console script as a user runs it, from ``root``, with runs under ``root/runs``."""
    command = [str(KDLAB), *args, f"runtime.runs_dir={root / 'runs'}", *FAST]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"kdlab failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def no_login_env(home: Path, **extra: str) -> dict[str, str]:
    """A user with no W&B login and no W&B settings in the environment (plus ``extra``)."""
    drop = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "HOME": str(home), "NETRC": str(home / ".netrc"), "WANDB_SILENT": "true", **extra}


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One seed of a three-row ablation table, W&B left at its default (``auto``): offline here."""
    root = tmp_path_factory.mktemp("ablation")
    (root / "abl.yaml").write_text(TABLE)
    kdlab(root, "table", "abl.yaml", "--out", "results", env=no_login_env(root))
    return root


def wandb_runs(root: Path, folder: str) -> list[tuple[Path, list[Any]]]:
    """(run folder, records) of every W&B run under ``runs/<folder>``."""
    found = [(path, find_wandb_files(path)) for path in sorted((root / "runs" / folder).iterdir())]
    return [(path, read_records(files[0])) for path, files in found if files]


def test_cells_share_the_table_group_with_method_job_types_tags_and_swept_keys(table: Path) -> None:
    students = wandb_runs(table, "mnist1d-kd")
    assert len(students) == 2
    temperatures = set()
    for run_dir, records in students:
        info, logged = run_info(records), config(records)
        assert info["group"] == "table/abl"
        assert info["job_type"] == "kd"
        assert set(info["tags"]) >= STUDENT_TAGS
        assert "pair:mnist1d_cnn->mnist1d_mlp" in info["tags"]
        # The swept keys, top level and scalar (what parallel coordinates plot), equal to the spec.
        temperature = logged["method.params.temperature"]
        assert temperature == logged["method"]["params"]["temperature"]
        assert logged["seed"] == 0 and logged["experiment"] == "mnist1d-kd"
        assert logged["sweep"]["method.params.temperature"] == temperature
        assert logged["stage"] == "student", "the stage stays in the config beside the job type"
        if temperature == 4:  # a dict-valued override surfaces as JSON, still one scalar
            assert json.loads(logged["student.model.kwargs"]) == logged["student"]["model"]["kwargs"] == {"hidden": 50}
        else:
            assert "student.model.kwargs" not in logged
        temperatures.add(temperature)
        assert (run_dir / "metrics.json").exists()
    assert temperatures == {2, 4}


def test_the_teacher_is_a_teacher_in_the_same_group(table: Path) -> None:
    ((_, records),) = wandb_runs(table, "teachers")
    info = run_info(records)
    assert info["group"] == "table/abl" and info["job_type"] == "teacher"
    assert {"stage:teacher", "dataset:mnist1d", "model:mnist1d_cnn", "table:abl"} <= set(info["tags"])
    assert config(records)["stage"] == "teacher"


def markdown_table(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table that `kdlab table` wrote."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|") and "---" not in line]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1:]


def test_the_table_run_logs_the_rendered_table_and_its_png(table: Path) -> None:
    files = sorted((table / "runs" / "tables" / "abl").glob("wandb/offline-run-*/run-*.wandb"))
    records = read_records(files[0])
    info = run_info(records)
    assert info["group"] == "table/abl" and info["job_type"] == "table"
    (row,) = history(records)
    run_files = files[0].parent / "files"

    assert row["comparison"]["_type"] == "table-file"
    logged = json.loads((run_files / row["comparison"]["path"]).read_text())
    header, rows = markdown_table(table / "results" / "abl.md")
    assert logged["columns"][: len(header)] == header
    assert [line[: len(header)] for line in logged["data"]] == rows
    # The CSV's numbers ride along, so W&B can chart and sort them.
    extra = logged["columns"][len(header) :]
    csv_rows = list(csv.DictReader((table / "results" / "abl.csv").open()))
    assert {"top1_mean", "top1_std", "params_mean", "seeds_done"} <= set(extra)
    for line, csv_row in zip(logged["data"], csv_rows, strict=True):
        values = dict(zip(extra, line[len(header) :], strict=True))
        assert values["top1_mean"] == pytest.approx(float(csv_row["top1_mean"]))
        assert values["seeds_done"] == int(csv_row["seeds_done"])

    assert row["comparison_image"]["_type"] == "image-file"
    image = (run_files / row["comparison_image"]["path"]).read_bytes()
    png = (table / "results" / "abl.png").read_bytes()
    assert hashlib.sha256(image).hexdigest() == hashlib.sha256(png).hexdigest()


def finished_table(root: Path, runtime: RuntimeConfig) -> TableResult:
    """The ablation table as if every cell had finished (no training): for the W&B edge cases."""
    (root / "abl.yaml").write_text(TABLE)
    spec = load_table(str(root / "abl.yaml"))
    cells = [
        Cell(row, 0, {"test/top1": 50.0 + i, "params": 1000.0, "epochs": 1}, root) for i, row in enumerate(spec.rows)
    ]
    return TableResult(spec, [0], cells, 1.0, runtime=runtime)


def test_wandb_mode_disabled_in_the_environment_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    result = finished_table(tmp_path, RuntimeConfig(runs_dir=str(tmp_path / "runs")))  # runtime.wandb=auto
    files = write_outputs(result, tmp_path / "results")
    assert all(path.exists() for path in files)
    assert not list(tmp_path.rglob("*wandb*"))


def test_a_wandb_failure_only_warns(table: Path, tmp_path: Path) -> None:
    """An invalid project name makes ``wandb.init`` raise, offline too: the table's files and a
    training run still finish, with a warning each."""
    bad = "no/such:project"
    result = finished_table(
        tmp_path, RuntimeConfig(runs_dir=str(tmp_path / "runs"), wandb="offline", wandb_project=bad)
    )
    with pytest.warns(UserWarning, match="the table was not logged to W&B"):
        files = write_outputs(result, tmp_path / "results")
    assert all(path.exists() for path in files)

    trained = kdlab(table, "run", "mnist1d-ce", f"runtime.wandb_project={bad}", env=no_login_env(table))
    assert "W&B logging disabled for this run" in trained.stderr
    (run_dir,) = sorted((table / "runs" / "mnist1d-ce").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    assert not find_wandb_files(run_dir)


SERVICE_DIES = """
import os, signal, sys, warnings
from pathlib import Path
import lightning as L, torch
from torch.utils.data import DataLoader, TensorDataset
from kdlab.config import RuntimeConfig
from kdlab.loggers import log_summary, make_loggers

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
    def training_step(self, batch, _):
        loss = torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

class KillWandb(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 0:  # the W&B service (a child process of this one) dies
            for listing in Path("/proc/self/task").glob("*/children"):
                for pid in listing.read_text().split():
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "wandb-core":
                        os.kill(int(pid), signal.SIGKILL)

data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
spec = {"stage": "student", "data": {"name": "toy"}, "method": {"name": "ce"}, "student": {"model": {"name": "t"}}}
loggers = make_loggers(Path(sys.argv[1]), RuntimeConfig(wandb="offline"), "toy/student", "student", spec, 1)
assert len(loggers) == 2, loggers
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = L.Trainer(max_epochs=3, logger=loggers, callbacks=[KillWandb()], log_every_n_steps=1,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))
    log_summary(loggers, {"done": 1})
stopped = [str(w.message) for w in caught if "W&B logging stopped" in str(w.message)]
print("EPOCHS", trainer.current_epoch, "WARNINGS", len(stopped))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the W&B service process through /proc")
def test_the_wandb_service_dying_mid_run_does_not_end_training(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVICE_DIES, str(tmp_path)],
        env=no_login_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "EPOCHS 3 WARNINGS 1" in result.stdout, result.stdout + result.stderr
    with open(tmp_path / "logs" / "attempt-1" / "metrics.csv", newline="") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle)}
    assert epochs == {"0", "1", "2"}, "the CSV log went on after W&B stopped"


# --- the function tables and sweeps call ---------------------------------------------------------


def test_ablation_runtime_sets_group_swept_keys_and_tags() -> None:
    swept = {**swept_values(["method.name=dkd", "method.params.beta=6", "student.model.kwargs={a: 1}"]), "seed": 2}
    assert swept == {"method.name": "dkd", "method.params.beta": 6, "student.model.kwargs": {"a": 1}, "seed": 2}
    runtime = ablation_runtime(RuntimeConfig(wandb_tags=["mine"]), "sweep/lr", swept, tags=["sweep:lr"])
    assert runtime.wandb_group == "sweep/lr"
    assert runtime.wandb_sweep == {**swept, "student.model.kwargs": '{"a": 1}'}  # scalars only
    assert runtime.wandb_tags == ["mine", "sweep:lr"]
    named = ablation_runtime(RuntimeConfig(wandb_group="my-group"), "sweep/lr", {})
    assert named.wandb_group == "my-group", "a group the user names wins"


def test_wandb_settings_never_rename_a_run(tmp_path: Path) -> None:
    config = load_experiment("mnist1d-kd", [f"runtime.runs_dir={tmp_path}"])
    plain = plan_experiment(config)
    config.runtime = ablation_runtime(config.runtime, "table/x", {"method.name": "kd", "seed": 0}, tags=["t"])
    ablated = plan_experiment(config)
    assert ablated.student_run.dir == plain.student_run.dir
    assert ablated.teacher_run is not None and plain.teacher_run is not None
    assert ablated.teacher_run.dir == plain.teacher_run.dir
