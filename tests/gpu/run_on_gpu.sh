#!/bin/bash
# The GPU check (not CI): the test suite and a real `kdlab run` on a CUDA machine, where every
# run picks the GPU through runtime.accelerator=auto. Usage, from the repository root, in a Python
# environment that has torch with CUDA (optional: pure-Python wheels kdlab needs in .whl/):
#   bash tests/gpu/run_on_gpu.sh [OUT_DIR]
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/kdlab-site .whl/*.whl && export PYTHONPATH=/tmp/kdlab-site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v -i warning | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, \
'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
python3 -m kdlab.cli run mnist1d-kd runtime.runs_dir=/tmp/kdlab-gpu-runs teacher.train.epochs=10 \
    student.train.epochs=10 runtime.wandb=disabled 2>&1 | tail -4 | tee "$out/run.txt"
# W&B's offline writer needs its wandb-core binary; skip its tests where wandb is not installed.
skip=()
python3 -c "import wandb" 2>/dev/null || skip=(--ignore tests/test_wandb.py)
python3 -m pytest -q -p no:cacheprovider "${skip[@]}" tests 2>&1 | tee "$out/pytest.txt" | tail -25
