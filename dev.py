#!/usr/bin/env python3
"""The two commands of the README, runnable on a machine with nothing but Python 3.10+.

    python3 dev.py demo    # set up .venv, then run the MNIST-1D KD comparison table (3 seeds)
    python3 dev.py test    # set up .venv, then ruff, a local Slurm cluster and the whole test suite

Set-up is idempotent: ``.venv`` is (re)installed only when pyproject.toml changed since the last
install. Extra arguments go to the underlying command (``kdlab table`` or ``pytest``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".kdlab-installed"
VENV_GIB = 7.0  # a new .venv with torch's CUDA wheel is 6.2 GiB; pip unpacks beside it


def check_disk_for_venv() -> None:
    """Stop with the numbers before pip fills the disk halfway through an install."""
    free_gib = shutil.disk_usage(ROOT).free / 2**30
    if free_gib < VENV_GIB:
        sys.exit(
            f"not enough disk for {VENV}: {free_gib:.1f} GiB free on {ROOT}'s disk, "
            f"about {VENV_GIB:.0f} GiB needed (torch and the test tools); free some space and rerun"
        )


def run(*command: str | Path) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run([str(c) for c in command], cwd=ROOT, check=True)


def ensure_venv() -> None:
    """Create .venv and install kdlab (editable, with test tools) if pyproject.toml changed."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        check_disk_for_venv()
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    run(BIN / "python", "-m", "pip", "install", "--quiet", "--upgrade", "pip")
    run(BIN / "python", "-m", "pip", "install", "--quiet", "-e", ".[test]")
    STAMP.write_text(wanted)


def start_local_slurm() -> None:
    """The Slurm tests run against a real one-node cluster on localhost: start it (idempotent;
    installs Debian's slurm-wlm on first use). Exit code 3 means it cannot run on this machine
    (not root, no apt-get): those tests then skip, saying why; any other failure stops here."""
    command = ["bash", str(ROOT / "slurm" / "local-cluster.sh"), "start"]
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode
    if code == 3:
        print("no local Slurm cluster on this machine: the Slurm tests will be skipped", flush=True)
    elif code:
        raise subprocess.CalledProcessError(code, command)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, extra = sys.argv[1], sys.argv[2:]
    ensure_venv()
    os.environ.setdefault("WANDB_MODE", "offline")  # never block on a login prompt
    if command == "demo":
        run(BIN / "kdlab", "table", "mnist1d-kd", "--seeds", "3", *extra)
    else:
        run(BIN / "ruff", "check", ".")
        start_local_slurm()
        run(BIN / "python", "-m", "pytest", "--durations=25", *extra)  # the slowest tests, to keep CI in time
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
