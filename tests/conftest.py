"""Shared test set-up: W&B offline and quiet, one intra-op thread per test process."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    """Tiny test models run faster on one thread than two fighting over a shared 2-core box."""
    torch.set_num_threads(1)
