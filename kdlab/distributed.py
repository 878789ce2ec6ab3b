"""One experiment on 1 CPU, 8 GPUs or a Slurm cluster: ``runtime.strategy``, devices and nodes.

``data.batch_size`` is the *global* batch: each of the ``world`` processes loads ``batch_size /
world`` samples (rank ``r`` takes positions ``r::world`` of the epoch's order), so a run's numbers do
not depend on its device count. Every process runs the whole pipeline; only global rank 0 writes run
files (status, metrics, model, plots), and the other ranks wait for it, then read them.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kdlab.config import RuntimeConfig
from kdlab.errors import ConfigError

if TYPE_CHECKING:
    from kdlab.runs import Run

SHARDING_STRATEGIES = ("deepspeed_stage_3", "fsdp2")
# Strategies that hold other than a full plain copy of the model on each rank after training.
WRAPPING_STRATEGIES = ("deepspeed_stage_2", "deepspeed_stage_3", "fsdp2")


def under_srun() -> bool:
    """Whether Slurm started this process as one task of a job step (``srun``): Lightning's
    SLURMEnvironment test, without its warning on machines that merely have ``srun``."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def devices_and_nodes(runtime: RuntimeConfig) -> tuple[int, int]:
    """Devices per node and nodes: the config's, else the Slurm job step's, else one of each."""
    slurm = under_srun()
    devices = runtime.devices or (int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]) if slurm else 1)
    nodes = runtime.num_nodes or (int(os.environ.get("SLURM_NNODES", "1")) if slurm else 1)
    return devices, nodes


def world_size(runtime: RuntimeConfig) -> int:
    devices, nodes = devices_and_nodes(runtime)
    return devices * nodes


def strategy_name(runtime: RuntimeConfig) -> str:
    """The configured strategy; ``auto`` is DDP on more than one process (Lightning's own auto
    choice on CPU, ``ddp_spawn``, cannot return results to the pipeline)."""
    if runtime.strategy == "auto":
        return "ddp" if world_size(runtime) > 1 else "auto"
    return runtime.strategy


def check_runtime(runtime: RuntimeConfig, batch_size: int) -> None:
    """The strategy, device count and global batch agree; one line naming what does not."""
    world = world_size(runtime)
    if batch_size % world:
        raise ConfigError(
            f"data.batch_size={batch_size} is the global batch and must divide evenly over {world} processes"
            f" (runtime.devices x runtime.num_nodes); use a multiple of {world}"
        )
    if runtime.strategy.startswith("deepspeed"):
        _check_deepspeed(runtime)


def _check_deepspeed(runtime: RuntimeConfig) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"runtime.strategy={runtime.strategy} needs deepspeed: {error}") from None
    if runtime.accelerator == "cpu" and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise ConfigError(
            f"runtime.strategy={runtime.strategy} with runtime.accelerator=cpu needs DS_ACCELERATOR=cpu in the"
            " environment (DeepSpeed picks its accelerator when it is imported)"
        )


def build_strategy(runtime: RuntimeConfig) -> Any:
    """A Lightning strategy (object or name) for ``runtime``."""
    name = strategy_name(runtime)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # Method adapters and scheme heads can sit out a step (an init stage, a skipped term);
        # frozen teachers never reach DDP's buckets (they require no grad).
        return DDPStrategy(find_unused_parameters=True)
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size(runtime), tensor_parallel_size=1)
    if name.startswith("deepspeed"):
        return deepspeed_strategy(int(name[-1]), runtime.accelerator)
    return name


def wraps_model(runtime: RuntimeConfig) -> bool:
    """Whether training changes the modules' parameters in place (sharding, engines): such runs
    train a copy of the system and load the gathered full state back into the original."""
    return strategy_name(runtime) in WRAPPING_STRATEGIES


# -- ranks --------------------------------------------------------------------------------------------
def global_rank(runtime: RuntimeConfig) -> int:
    """This process's global rank, also before the process group exists (from the launcher's
    environment: torchrun's ``RANK``, Slurm's ``SLURM_PROCID``, Lightning's ``NODE_RANK``/``LOCAL_RANK``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if under_srun():
        return int(os.environ.get("SLURM_PROCID", "0"))
    devices, _ = devices_and_nodes(runtime)
    return int(os.environ.get("NODE_RANK", "0")) * devices + int(os.environ.get("LOCAL_RANK", "0"))


def is_global_zero(runtime: RuntimeConfig) -> bool:
    return global_rank(runtime) == 0


def rank_zero_decides(value: bool) -> bool:
    """Rank 0's ``value`` on every rank (a run's "finished?"), so all ranks take the same branch."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return bool(holder[0])


def wait_for_rank_zero(run: Run, poll_seconds: float = 0.5) -> None:
    """Block until rank 0 has written ``run``'s files: a barrier once the process group exists,
    else (a Slurm step's ranks before their first training) until ``metrics.json`` appears."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        return
    while not run.is_finished():
        if run.status().get("state") == "failed":
            raise RuntimeError(f"rank 0 failed on {run.dir}: {run.status().get('error')}")
        time.sleep(poll_seconds)


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank holds of ``module``: a DTensor's local shard (FSDP2), a ZeRO-3
    partition (``ds_tensor``), or the whole tensor."""
    total = 0
    for parameter in module.parameters():
        if hasattr(parameter, "ds_tensor"):
            total += parameter.ds_tensor.numel()
        elif hasattr(parameter, "to_local"):
            total += parameter.to_local().numel()
        else:
            total += parameter.numel()
    return total


def full_state_dict(trainer: Any) -> dict[str, Any]:
    """The trained system's full (unsharded) state on rank 0, CPU tensors; collective, so every
    rank calls it. Other ranks get an empty dict. (Teachers are left out: they are not trained.)"""
    module = trainer.lightning_module
    if hasattr(trainer.strategy, "deepspeed_engine"):
        import deepspeed

        trained = [p for name, p in module.named_parameters() if not name.startswith("teachers.")]
        with deepspeed.zero.GatheredParameters(trained, modifier_rank=None):  # no-op below ZeRO-3
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        return state if trainer.is_global_zero else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def deepspeed_strategy(stage: int, accelerator: str) -> Any:
    """Lightning's DeepSpeedStrategy at ZeRO ``stage``, writing the trainer's progress beside its
    shards (what resume reads, as in FSDP2 folders); on CPU (gloo, ``DS_ACCELERATOR=cpu``) minus
    its CUDA-only check, so the tests run the code path that GPUs run."""
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.strategies.ddp import DDPStrategy

    from kdlab.runs import SHARDED_METADATA

    class KdlabDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CPUAccelerator):
                DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own refuses non-CUDA devices
            else:
                super().setup_environment()

        @property
        def root_device(self) -> torch.device:
            # DeepSpeed takes the device's index as this process's device rank; a CPU has none.
            device = super().root_device
            return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

        def setup_distributed(self) -> None:
            if not isinstance(self.accelerator, CPUAccelerator):
                return super().setup_distributed()
            reset_seed()  # as DeepSpeedStrategy does, minus its check of CUDA device indices
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return None

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            progress = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
            super().save_checkpoint(checkpoint, filepath, storage_options)
            if self.is_global_zero:
                torch.save(progress, os.path.join(filepath, SHARDED_METADATA))

    return KdlabDeepSpeedStrategy(stage=stage, process_group_backend="gloo" if accelerator == "cpu" else None)
