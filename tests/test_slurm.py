"""Sweeps on a real Slurm (slurm/local-cluster.sh: slurmctld, slurmd and slurmdbd on localhost):
a 2x2 sweep as one job array sharing one teacher, a table whose crashing cells come back as
failed with their logs, and a job preempted mid-training (SIGUSR2, as Slurm sends before a time
limit or preemption) that requeues itself and ends with an uninterrupted run's exact metrics.

Each test has its own runs folder, so its own manifest and submitit folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import assert_same_numbers, metrics_of, saved_epoch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KDLAB = Path(sys.executable).parent / "kdlab"
TINY = [
    "teacher.train.epochs=2",
    "student.train.epochs=3",
    "runtime.wandb=disabled",
    "runtime.threads=1",
    "runtime.progress=false",
]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Start the local cluster (idempotent); skip only where it cannot run (exit code 3)."""
    result = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start"], capture_output=True, text=True, timeout=900
    )
    if result.returncode == 3:
        pytest.skip(f"no local Slurm: {result.stderr.strip()}")
    assert result.returncode == 0, f"slurm/local-cluster.sh start failed:\n{result.stdout}\n{result.stderr}"


def kdlab(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KDLAB), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def manifest(runs: Path) -> dict:
    (path,) = runs.glob("sweeps/*/manifest.json")
    return json.loads(path.read_text())


def test_a_2x2_sweep_runs_as_a_job_array_sharing_one_teacher(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    grid = ["method.params.temperature=1,4", "student.train.optimizer.lr=0.01,0.003"]
    args = ["sweep", "mnist1d-kd", *grid, f"runtime.runs_dir={runs}", *TINY, "--launcher", "slurm", "--time", "10"]
    result = kdlab(*args, "--wait", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 4 jobs" in result.stdout and "0 pending, 0 running, 4 done, 0 failed" in result.stdout
    cells = manifest(runs)["cells"]
    assert len({c["job_id"].split("_")[0] for c in cells}) == 1  # one array
    assert sorted(c["job_id"].split("_")[1] for c in cells) == ["0", "1", "2", "3"]
    assert all((Path(c["run_dir"]) / "metrics.json").exists() for c in cells)
    # Four jobs, two at a time, one teacher: the file lock made the others wait and reuse it.
    (teacher,) = (runs / "teachers").iterdir()
    assert len(list((teacher / "logs").iterdir())) == 1
    outputs = "".join(Path(c["stdout"]).read_text() for c in cells)
    assert outputs.count("teacher: reusing finished run") == 3
    status = kdlab("status", manifest(runs)["name"], "--runs-dir", str(runs), cwd=tmp_path)
    assert status.returncode == 0 and "4 done" in status.stdout and "temperature=4" in status.stdout
    again = kdlab(*args, cwd=tmp_path)  # everything finished: nothing is submitted
    assert again.returncode == 0 and "submitted 0 jobs, 4 cells already done" in again.stdout


def test_a_table_on_slurm_shows_crashed_cells_as_failed_with_their_logs(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "results"
    diverge = "student.train.optimizer.lr=1e30"  # the MLP students diverge; teacher and logistic rows train
    args = ["table", "mnist1d-kd", "--seeds", "1", "--out", str(out), f"runtime.runs_dir={runs}", *TINY, diverge]
    result = kdlab(*args, "--launcher", "slurm", "--time", "10", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    cells = {c["label"]: c for c in json.loads((out / "mnist1d-kd.json").read_text())["cells"]}
    assert cells["Teacher: CNN"]["error"] is None and cells["Teacher: CNN"]["metrics"]["test/top1"] > 0
    failed = cells["Student: MLP, KD (T=1)"]
    assert "FAILED" in failed["error"] and "non-finite loss" in failed["error"]
    log = failed["error"].rsplit("(log ", 1)[1].rstrip(")")
    assert log.endswith("_log.err") and "non-finite loss" in Path(log).read_text()
    markdown = (out / "mnist1d-kd.md").read_text()
    assert "| failed |" in markdown and "Student: MLP, KD (T=1) (1 failed: see" in markdown
    status = kdlab("status", manifest(runs)["name"], "--runs-dir", str(runs), cwd=tmp_path)
    assert "2 done, 2 failed" in status.stdout and "_log.err" in status.stdout


def squeue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


def sacct_states(job: str) -> list[str]:
    """Every attempt's state in accounting, oldest first (``-D`` keeps the requeued attempt)."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-o", "State", "-j", job], capture_output=True, text=True)
    return out.stdout.split()


def test_a_preempted_job_requeues_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    epochs = ["teacher.train.epochs=2", "student.train.epochs=60"]  # ~10 s of student epochs
    config = [*TINY[2:], *epochs, "runtime.deterministic=true"]
    runs = tmp_path / "slurm-runs"
    args = ["sweep", "mnist1d-kd", f"runtime.runs_dir={runs}", *config, "--launcher", "slurm", "--time", "10"]
    assert kdlab(*args, cwd=tmp_path).returncode == 0
    (cell,) = manifest(runs)["cells"]
    job = cell["job_id"]
    checkpoint = Path(cell["run_dir"]) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while (saved_epoch(checkpoint) or 0) < 1:
        assert time.monotonic() < deadline, "the student wrote no checkpoint within 300 s"
        time.sleep(0.05)
    # What Slurm sends ahead of a time limit or preemption (submitit asks for --signal=USR2@90).
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # The uninterrupted reference, here, in another runs folder, meanwhile.
    reference = kdlab("run", "mnist1d-kd", f"runtime.runs_dir={tmp_path / 'reference'}", *config, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    # Slurm holds a requeued job for about two minutes (BeginTime); release it now.
    while squeue_state(job) != "PENDING":
        assert time.monotonic() < deadline, f"job {job} was not requeued: {Path(cell['stderr']).read_text()}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    while squeue_state(job):
        assert time.monotonic() < deadline, f"job {job} did not finish after its requeue"
        time.sleep(0.5)
    assert "Caught signal SIGUSR2" in Path(cell["stdout"]).read_text()  # submitit's log, both attempts
    # slurmdbd records the end a moment after squeue drops the job: wait for accounting to catch up.
    while (history := sacct_states(job))[-1:] == ["RUNNING"]:
        assert time.monotonic() < deadline, f"accounting still shows job {job} running: {history}"
        time.sleep(0.5)
    assert history == ["REQUEUED", "COMPLETED"]
    run_dir = Path(cell["run_dir"])
    assert (run_dir / "metrics.json").exists(), Path(cell["stderr"]).read_text()[-3000:]
    assert len(list((run_dir / "logs").iterdir())) == 2  # the preempted attempt, and the resumed one
    (reference_run,) = (tmp_path / "reference" / "mnist1d-kd").iterdir()
    assert_same_numbers(metrics_of(run_dir), metrics_of(reference_run))
