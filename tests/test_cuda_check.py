"""Lightning makes torch count GPUs through NVML at every ``cuda.is_available()``; kdlab asks for
the plain, cached count where NVML cannot load, so an optimiser step does not reload a library
that is not there. Where NVML does load, the check is left as Lightning set it."""

from __future__ import annotations

import ctypes
import subprocess
import sys

COUNT_NVML_LOADS = """
import ctypes
import torch
import kdlab.training  # imports Lightning, which turns the NVML check on

loads = []
load = ctypes.CDLL.__init__
def counting_load(self, name, *args, **kwargs):
    loads.append(str(name))
    return load(self, name, *args, **kwargs)
ctypes.CDLL.__init__ = counting_load

model = torch.nn.Linear(4, 2)
optimizer = torch.optim.Adam(model.parameters())
for _ in range(5):
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
import os
print(os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"], sum("nvidia-ml" in name for name in loads))
"""


def nvml_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


def test_adam_steps_reload_nvml_only_where_it_exists() -> None:
    done = subprocess.run([sys.executable, "-c", COUNT_NVML_LOADS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    nvml_check, loads_during_steps = done.stdout.split()[-2:]
    if nvml_loads():
        assert nvml_check == "1"  # a machine with a driver keeps Lightning's fork-safe count
    else:
        assert (nvml_check, loads_during_steps) == ("0", "0")
