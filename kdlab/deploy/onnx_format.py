"""ONNX files for onnxruntime (phones, browsers, edge boxes), int8 by onnxruntime's quantizer.

The float graph comes from torch's ``torch.export``-based exporter with a dynamic batch axis.
Int8 is onnxruntime's: ``dynamic`` quantizes weights and computes activation ranges per batch;
``static`` writes a QDQ graph (int8 weights per output channel, int8 activations) whose ranges
are the min/max over calibration samples, after onnxruntime's own pre-processing (shape
inference and graph optimisation, as its documentation recommends before static quantization).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdlab.deploy.formats import EXPORT_FORMATS, ExportError, ExportFormat, Runner, failed_op, first_line

INPUT, OUTPUT = "input", "logits"


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a list of input batches."""

    def __init__(self, batches: Sequence[torch.Tensor]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch.numpy()}


def _refuse_torch_int8(model: nn.Module) -> None:
    """torch's int8 layers (a quantized-scheme student) run packed kernels with no ONNX form."""
    for name, layer in model.named_modules():
        kind = type(layer)
        if kind.__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            raise ExportError(
                f"ONNX cannot express torch's int8 op of layer '{name}' ({kind.__module__}.{kind.__name__}):"
                " this student is a torch int8 model; export it with --format torchscript, or export a float"
                " student with --int8 for onnxruntime's own int8"
            )


@EXPORT_FORMATS.register()
class OnnxFormat(ExportFormat):
    """ONNX (opset of torch's exporter), run with onnxruntime; int8 by onnxruntime's quantizer."""

    name = "onnx"
    suffix = ".onnx"

    def export(self, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        _refuse_torch_int8(model)
        batch = torch.export.Dim("batch")
        try:
            # The exporter prints its progress on stdout; kdlab prints its own table instead.
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    dynamic_shapes=({0: batch},),
                    input_names=[INPUT],
                    output_names=[OUTPUT],
                    external_data=False,  # one self-contained file (students are far below ONNX's 2 GB cap)
                    verbose=False,
                )
        except Exception as error:  # noqa: BLE001 - every exporter failure becomes one line
            op = failed_op(error)
            if op is not None:
                raise ExportError(
                    f"ONNX cannot express op '{op}' of {type(model).__name__}: neither an ONNX function nor a"
                    " decomposition exists for it; export with --format torchscript, or replace that op"
                ) from None
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {first_line(error)}") from None

    def export_int8(
        self, model: nn.Module, float_path: Path, path: Path, mode: str, calibration: Sequence[torch.Tensor]
    ) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        if mode == "dynamic":
            quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
            return
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared))
            quantize_static(
                str(prepared),
                str(path),
                _Calibration(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )

    def load(self, path: Path, threads: int = 1) -> Runner:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(inputs: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])

        return run
