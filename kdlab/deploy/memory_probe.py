"""Child process of :mod:`kdlab.deploy.latency`: peak memory of loading a model and running it.

    python -m kdlab.deploy.memory_probe torch|torchscript|onnx MODEL_FILE INPUT_FILE THREADS

Prints ``{"peak_mb": ...}``: the growth of peak RSS over the RSS before loading (after the
runtime's import), or ``null`` where ``/proc/self/clear_refs`` cannot reset the peak.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

import kdlab.models  # noqa: F401 - the classes a pickled kdlab or timm model refers to


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        return False
    return True


def main(kind: str, model_file: str, input_file: str, threads: int) -> float | None:
    warnings.simplefilter("ignore")  # torch.jit's deprecation notices; stdout carries the result
    torch.set_num_threads(threads)
    example = torch.load(input_file)
    if kind == "onnx":
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    if not _reset_peak():
        return None
    before = _status_kib("VmRSS")
    if kind in ("torch", "torchscript"):
        if kind == "torch":
            model = torch.load(model_file, weights_only=False).eval()
        else:
            model = torch.jit.load(model_file).eval()
        with torch.inference_mode():
            for _ in range(3):
                model(example)
    else:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(3):
            session.run(None, {name: example.numpy()})
    return (_status_kib("VmHWM") - before) / 1024


if __name__ == "__main__":
    kind, model_file, input_file, threads = sys.argv[1:5]
    print(json.dumps({"peak_mb": main(kind, model_file, input_file, int(threads))}))
