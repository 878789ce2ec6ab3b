"""W&B logging end to end: a real tiny teacher -> student run writes offline ``.wandb`` files, read
back byte by byte (tests/wandb_records.py), so what a later ``wandb sync`` would upload is checked:
the config, the per-step and per-epoch history, and a summary equal to ``metrics.json``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from wandb_records import WandbFileError, config, find_wandb_files, history, read_records, summary

from kdlab.errors import ConfigError
from kdlab.loggers import _has_login, wandb_mode

KDLAB = Path(sys.executable).parent / "kdlab"
SEED, TEMPERATURE, EPOCHS = 1, 2.0, 2


def kdlab_env() -> dict[str, str]:
    """The test's environment minus anything that would redirect or silence W&B behind kdlab's back."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY")}
    env["WANDB_SILENT"] = "true"
    return env


def run_kdlab(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a user runs it; a failure shows kdlab's own output."""
    result = subprocess.run(
        [str(KDLAB), "run", *args], cwd=cwd, env=kdlab_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"kdlab failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny mnist1d-kd run with W&B offline: its teacher and student run folders.

    One intra-op thread: on a shared two-core machine two threads spin against each other and
    make these tiny models many times slower (runtime options do not change the run hash)."""
    root = tmp_path_factory.mktemp("kd")
    run_kdlab(
        "mnist1d-kd",
        f"runtime.runs_dir={root / 'runs'}",
        f"seed={SEED}",
        f"method.params.temperature={TEMPERATURE}",
        f"teacher.train.epochs={EPOCHS}",
        f"student.train.epochs={EPOCHS}",
        "runtime.progress=false",
        "runtime.wandb=offline",
        "runtime.threads=1",
        cwd=root,
    )
    return {
        "teacher": only(sorted((root / "runs" / "teachers").iterdir())),
        "student": only(sorted((root / "runs" / "mnist1d-kd").iterdir())),
    }


def records_of(run_dir: Path) -> list[Any]:
    return read_records(only(find_wandb_files(run_dir)))


def epoch_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    return [row for row in rows if key in row]


def check_history(rows: list[dict[str, Any]], step_keys: tuple[str, ...], epoch_keys: tuple[str, ...]) -> None:
    """Step rows carry every loss term; each epoch has one row of epoch means and one of val metrics."""
    step_rows = epoch_rows(rows, "train/loss_step")
    assert len(step_rows) >= EPOCHS, "too few step rows: log_every_n_steps broke?"
    for row in step_rows:
        for key in (*step_keys, "train/lr", "epoch"):
            assert key in row, f"{key} missing from step row {row}"
        assert all(math.isfinite(row[key]) for key in step_keys)
    assert {row["epoch"] for row in step_rows} == set(range(EPOCHS))
    for key in (*epoch_keys, "val/top1"):
        logged = epoch_rows(rows, key)
        assert [row["epoch"] for row in logged] == list(range(EPOCHS)), f"{key} per epoch: {logged}"


def test_student_config_history_and_summary(kd_run: dict[str, Path]) -> None:
    records = records_of(kd_run["student"])
    logged = config(records)
    assert logged["stage"] == "student"
    assert logged["seed"] == SEED
    assert logged["method"]["name"] == "kd"
    assert logged["method"]["params"]["temperature"] == TEMPERATURE
    assert logged["method"]["weights"] == {"ce": 0.1, "kd": 0.9}
    assert logged["student"]["model"]["name"] == "mnist1d_mlp"
    assert logged["student"]["train"]["epochs"] == EPOCHS
    assert logged["teacher"]["run"] == kd_run["teacher"].name

    check_history(
        history(records),
        step_keys=("train/loss_step", "train/kd_step", "train/ce_step"),
        epoch_keys=("train/loss", "train/kd", "train/ce"),
    )

    metrics = json.loads((kd_run["student"] / "metrics.json").read_text())
    final = summary(records)
    for key in ("test/top1", "test/nll", "test/ece", "val/top1"):
        assert final[key] == pytest.approx(metrics[key], abs=1e-6), key
    assert final["method"] == "kd"
    assert final["model"] == "mnist1d_mlp"


def test_teacher_config_history_and_summary(kd_run: dict[str, Path]) -> None:
    records = records_of(kd_run["teacher"])
    logged = config(records)
    assert logged["stage"] == "teacher"
    assert logged["seed"] == SEED
    assert logged["model"]["name"] == "mnist1d_cnn"
    assert logged["calibration"]["method"] == "temperature"
    assert "method" not in logged, "the teacher's config must not depend on the student's method"

    check_history(history(records), step_keys=("train/loss_step", "train/ce_step"), epoch_keys=("train/loss",))

    metrics = json.loads((kd_run["teacher"] / "metrics.json").read_text())
    final = summary(records)
    for key in ("test/top1", "test/top1_calibrated", "calibration/temperature"):
        assert final[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_step_history_matches_the_csv_log(kd_run: dict[str, Path]) -> None:
    """Both loggers see the same step records: W&B is not a second, diverging source of truth."""
    import csv

    with open(kd_run["student"] / "logs" / "attempt-1" / "metrics.csv", newline="") as handle:
        csv_steps = {
            int(row["step"]): float(row["train/loss_step"]) for row in csv.DictReader(handle) if row["train/loss_step"]
        }
    wandb_steps = {
        int(row["trainer/global_step"]): row["train/loss_step"]
        for row in history(records_of(kd_run["student"]))
        if "train/loss_step" in row
    }
    assert wandb_steps == csv_steps


def test_disabled_writes_no_wandb_files(tmp_path: Path) -> None:
    run_kdlab(
        "mnist1d-ce",
        f"runtime.runs_dir={tmp_path / 'runs'}",
        "student.train.epochs=1",
        "runtime.progress=false",
        "runtime.wandb=disabled",
        "runtime.threads=1",
        cwd=tmp_path,
    )
    run_dir = only(sorted((tmp_path / "runs" / "mnist1d-ce").iterdir()))
    assert (run_dir / "metrics.json").exists()
    assert (run_dir / "logs" / "attempt-1" / "metrics.csv").exists()
    assert not [p for p in tmp_path.rglob("*") if "wandb" in p.name], "W&B wrote files while disabled"


@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user with no API key, no netrc entry and no W&B mode in the environment."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_auto_without_login_is_offline(no_wandb_login: Path) -> None:
    assert wandb_mode("auto") == "offline"


def test_auto_with_login_but_unreachable_server_is_offline(
    no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A login alone is not enough: a server that refuses connections means offline, not a hang."""
    netrc_file = no_wandb_login / ".netrc"
    netrc_file.write_text("machine 127.0.0.1\n  login user\n  password " + "0" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1")  # nothing listens on 443 here
    assert _has_login("127.0.0.1"), "the netrc login was not seen: the test would pass vacuously"
    assert wandb_mode("auto") == "offline"


@pytest.mark.parametrize(
    ("env_mode", "expected"),
    [("offline", "offline"), ("disabled", "disabled"), ("online", "online"), ("dryrun", "offline")],
)
def test_auto_follows_wandb_mode_env(
    no_wandb_login: Path, monkeypatch: pytest.MonkeyPatch, env_mode: str, expected: str
) -> None:
    monkeypatch.setenv("WANDB_MODE", env_mode)
    assert wandb_mode("auto") == expected


def test_explicit_modes_and_bad_values(no_wandb_login: Path) -> None:
    for mode in ("online", "offline", "disabled"):
        assert wandb_mode(mode) == mode
    with pytest.raises(ConfigError, match=r"runtime\.wandb"):
        wandb_mode("sometimes")


# --- the reader itself, on a file spanning many 32 KiB blocks ------------------------------------

WRITER = """
import sys, wandb
run = wandb.init(project="reader-test", mode="offline", dir=sys.argv[1], config={"big": "x" * 70000, "a": 1},
                 settings=wandb.Settings(quiet=True, console="off", disable_git=True))
for i in range(1500):
    run.log({"v": i * 0.5, "s": "y" * (i % 50)})
run.summary["final"] = 3.25
run.finish()
"""


@pytest.fixture(scope="module")
def big_wandb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real W&B-written file with a record split over three blocks and 1500 history rows."""
    root = tmp_path_factory.mktemp("big")
    subprocess.run([sys.executable, "-c", WRITER, str(root)], env=kdlab_env(), check=True, timeout=300)
    return only(sorted(root.glob("wandb/offline-run-*/run-*.wandb")))


def test_reader_spans_blocks(big_wandb_file: Path) -> None:
    assert big_wandb_file.stat().st_size > 8 * 32768
    records = read_records(big_wandb_file)
    assert config(records)["big"] == "x" * 70000  # FIRST, MIDDLE, LAST chunks reassembled
    rows = history(records)
    assert [row["v"] for row in rows] == [i * 0.5 for i in range(1500)]
    assert [row["_step"] for row in rows] == list(range(1500))
    assert summary(records)["final"] == 3.25


def test_reader_rejects_a_flipped_byte(big_wandb_file: Path, tmp_path: Path) -> None:
    blob = bytearray(big_wandb_file.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    damaged = tmp_path / "damaged.wandb"
    damaged.write_bytes(bytes(blob))
    with pytest.raises(WandbFileError):
        read_records(damaged)


def test_reader_rejects_a_truncated_file(big_wandb_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(big_wandb_file.read_bytes()[:40000])  # inside the 70 KB config record
    with pytest.raises(WandbFileError):
        read_records(truncated)
