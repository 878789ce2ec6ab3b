"""TorchScript files for PyTorch's C++ runtime (LibTorch, PyTorch Mobile), int8 by torch.ao.

The float model is traced (any model kdlab trains traces; its forward has no data-dependent
control flow). Int8 is torch's own: ``dynamic`` quantizes the Linear layers' weights (activations
per batch; convolutions stay float, which is all dynamic quantization offers in torch), ``static``
is FX graph mode post-training quantization with the CPU engine's default qconfig (int8 weights
per channel, uint8 activations calibrated on training samples), BatchNorm folded into its conv.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from kdlab.deploy.formats import EXPORT_FORMATS, ExportError, ExportFormat, Runner, failed_op, first_line


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.jit and torch.ao quantization announce their deprecation on every call (and the
    tracer warns about Python values it records as constants); nothing else is hidden."""
    with warnings.catch_warnings():
        for message in (
            r".*(torch\.jit|TorchScript|torch\.ao\.quantization).*deprecated",
            r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
            r"Please use quant_min and quant_max",
        ):
            warnings.filterwarnings("ignore", message=message)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _trace(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(model, example)
    except Exception as error:  # noqa: BLE001 - every tracer failure becomes one line
        op = failed_op(error)
        reason = f"op '{op}' cannot be traced" if op else first_line(error)
        raise ExportError(f"TorchScript export of {type(model).__name__} failed: {reason}") from None
    with _quiet():
        torch.jit.save(traced, str(path))


@EXPORT_FORMATS.register()
class TorchScriptFormat(ExportFormat):
    """TorchScript (torch.jit.trace), run with torch.jit.load; int8 by torch.ao quantization."""

    name = "torchscript"
    suffix = ".pt"

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        _trace(model, example, path)

    def export_int8(
        self, model: nn.Module, float_path: Path, path: Path, mode: str, calibration: Sequence[torch.Tensor]
    ) -> None:
        from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        example = calibration[0][:2]
        with _quiet():
            if mode == "dynamic":
                int8 = quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
            else:
                mapping = get_default_qconfig_mapping(torch.backends.quantized.engine)
                try:
                    prepared = prepare_fx(copy.deepcopy(model).eval(), mapping, example_inputs=(example,))
                except Exception as error:  # noqa: BLE001 - user forward code may raise anything while traced
                    raise ExportError(
                        f"static int8 needs torch.fx to trace {type(model).__name__}, which failed:"
                        f" {first_line(error)}; use --int8 dynamic"
                    ) from None
                with torch.no_grad():
                    for batch in calibration:
                        prepared(batch)
                int8 = convert_fx(prepared)
        _trace(int8, example, path)

    def load(self, path: Path, threads: int = 1) -> Runner:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run(inputs: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(inputs)

        return run
