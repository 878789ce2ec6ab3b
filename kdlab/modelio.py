"""Model files: what a finished run saves of its model, and loading weights from any kdlab file."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.errors import CheckpointError
from kdlab.files import atomic_write_bytes
from kdlab.runs import check_checkpoint

MODEL_FILE_FORMAT = "kdlab-model/1"


def load_model_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a kdlab ``model.pt``, a Lightning checkpoint of a kdlab run, or a bare state dict."""
    payload = check_checkpoint(path)
    load_payload_weights(model, payload, path)
    return payload if isinstance(payload, dict) else {}


def load_payload_weights(model: nn.Module, payload: Any, path: Path) -> None:
    """:func:`load_model_weights` for a file already read (``path`` names it in errors)."""
    if isinstance(payload, dict) and payload.get("format") == MODEL_FILE_FORMAT:
        state = payload["state_dict"]
    elif isinstance(payload, dict) and "state_dict" in payload:
        state = {k.removeprefix("student."): v for k, v in payload["state_dict"].items() if k.startswith("student.")}
        state = state or payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state = payload["model"]
    elif isinstance(payload, dict):
        state = payload
    else:
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not model weights")
    result = model.load_state_dict(state, strict=False)
    mismatch = [*result.missing_keys, *result.unexpected_keys]
    if mismatch:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )


def save_model(path: Path, model: nn.Module, name: str, kwargs: dict[str, Any], **extra: Any) -> None:
    """The trained model alone, atomically: what students load and what export will read."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FILE_FORMAT,
            "model": name,
            "kwargs": kwargs,
            "state_dict": model.state_dict(),
            **extra,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())
