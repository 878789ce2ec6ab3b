"""What an export format must do: write a float model, write an int8 one, and run a written file.

Each format is registered by name (``onnx``, ``torchscript``); ``kdlab export`` and the parity
check only talk to this interface, so a new format (TFLite, ExecuTorch) is one more module.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.registry import Registry

# Dynamic: int8 weights, activations quantized on the fly per batch (no calibration data).
# Static: int8 weights and activations, ranges calibrated on training samples beforehand.
INT8_MODES = ("dynamic", "static")

Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportError(KdlabError):
    """The model cannot be written in the format, or the written file disagrees with it."""


class ExportFormat(ABC):
    """A deployment file format (registered under ``name``; its files end in ``suffix``)."""

    name: str
    suffix: str

    @abstractmethod
    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        """Write ``model`` (eval mode) with a dynamic batch dimension; ``example`` has batch 2."""

    @abstractmethod
    def export_int8(
        self, model: nn.Module, float_path: Path, path: Path, mode: str, calibration: Sequence[torch.Tensor]
    ) -> None:
        """Write the int8 model (``mode`` in :data:`INT8_MODES`), from ``model`` or its float file."""

    @abstractmethod
    def load(self, path: Path, threads: int = 1) -> Runner:
        """A CPU function from an input batch to logits, running the written file."""


EXPORT_FORMATS: Registry[type[ExportFormat]] = Registry("export format")


_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"Unsupported: .*?operator ([\w:.]+)"),
    re.compile(r"(?:op|operator|function) '?((?:aten|prims|quantized)[:.]{1,2}\w+)"),
)


def failed_op(error: BaseException) -> str | None:
    """The operator an exporter failed on, found in the error or any error that caused it."""
    seen: BaseException | None = error
    while seen is not None:
        for pattern in _OP_PATTERNS:
            match = pattern.search(str(seen))
            if match:
                return match.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(error: BaseException) -> str:
    """The innermost error's first line: the exporters wrap the real reason in generic advice."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__
