"""Typed experiment configs: YAML in, dotted overrides, unknown or ill-typed keys fail before training.

The dataclasses below *are* the schema: every key a YAML file or an override may set, its type and
its default. OmegaConf validates and merges; this module turns its errors into one-line messages.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlab.errors import ConfigError

# Field metadata for options added after runs existed: a run spec leaves such a field out while it
# holds its default, so adding an option never renames (and retrains) the runs made before it.
ADDED_OPTION = {"omit_from_spec_at_default": True}


@dataclass
class ModelConfig:
    """A registered model (kdlab zoo or any timm name) and keyword arguments for its factory."""

    name: str = "mnist1d_mlp"
    kwargs: dict[str, Any] = field(default_factory=dict)


SAM_VARIANTS = ("none", "sam", "asam")


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    # Sharpness-aware minimisation around the optimiser above (kdlab/sam.py): none | sam | asam.
    sam: str = field(default="none", metadata=ADDED_OPTION)
    # Neighbourhood radius; None: the variant's paper default for CIFAR (SAM 0.05, ASAM 0.5).
    sam_rho: float | None = field(default=None, metadata=ADDED_OPTION)
    asam_eta: float = field(default=0.01, metadata=ADDED_OPTION)  # ASAM's T_w = |w| + eta

    def __post_init__(self) -> None:
        if self.sam not in SAM_VARIANTS:
            raise ConfigError(f"unknown optimizer.sam '{self.sam}' (valid: {', '.join(SAM_VARIANTS)})")
        if self.sam_rho is not None and self.sam_rho <= 0:
            raise ConfigError(f"optimizer.sam_rho must be positive, got {self.sam_rho}")
        if self.asam_eta < 0:
            raise ConfigError(f"optimizer.asam_eta must be >= 0, got {self.asam_eta}")


@dataclass
class ScheduleConfig:
    name: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: int = 0


@dataclass
class MixConfig:
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) of training batches (kdlab/mixing.py);
    off while both alphas are 0. ``switch_prob``: chance of CutMix when both are on."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance that a batch is mixed at all
    switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"mix alphas must be >= 0, got {self.mixup_alpha} and {self.cutmix_alpha}")
        if not (0.0 <= self.prob <= 1.0 and 0.0 <= self.switch_prob <= 1.0):
            raise ConfigError(f"mix.prob and mix.switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass
class TrainConfig:
    """The training recipe shared by teachers and students."""

    epochs: int = 240
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = 0.0
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    mix: MixConfig = field(default_factory=MixConfig, metadata=ADDED_OPTION)
    # This model's training augmentation, over ``data.augment`` (None: that). E.g. a teacher
    # trained with augmentation, its student distilled from a soft-label store without.
    augment: bool | None = field(default=None, metadata=ADDED_OPTION)
    # Score the test split after every epoch and report the best (test/top1_best), the way the
    # CRD and DKD tables were read; test/top1 stays the last epoch's.
    test_every_epoch: bool = field(default=False, metadata=ADDED_OPTION)


@dataclass
class DataConfig:
    """Dataset and loader; ``kwargs`` go to the dataset's own constructor (see `kdlab list datasets`)."""

    name: str = "mnist1d"
    root: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 512
    num_workers: int = 0
    val_fraction: float = 0.1  # held out from the training split: calibration and validation
    split_seed: int = 0  # the held-out split is fixed across training seeds
    augment: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CalibrationConfig:
    method: str = "temperature"  # temperature | vector | platt | none
    bins: int = 15


@dataclass
class TeacherConfig:
    """How the teacher is obtained: trained by this recipe, or loaded from ``checkpoint``."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="mnist1d_cnn"))
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    checkpoint: str | None = None
    # Divide teacher logits by the fitted calibration temperature before distillation. Off by
    # default: the papers distil raw logits and the KD temperature already sets the softness.
    use_calibrated_logits: bool = False
    # Initialisation and training seed; None: the experiment's seed plus the teacher's position in
    # ``teachers``, so same-architecture teachers of one experiment differ.
    seed: int | None = None
    # Where a student gets this teacher's outputs: "model" (its forward pass, every step) or
    # "cache" (a soft-label store written by `kdlab cache`; the teacher is never built).
    source: str = field(default="model", metadata=ADDED_OPTION)
    # The store's folder with source=cache; None: the default path `kdlab cache` writes to.
    store: str | None = field(default=None, metadata=ADDED_OPTION)
    # A deep ensemble of this many seeds as one teacher (kdlab/teachers/ensemble.py): member m
    # trains from seed + m * 7919 (member 0 is the single teacher) and the teacher's output is the
    # log of the members' averaged probabilities.
    ensemble: int = field(default=1, metadata=ADDED_OPTION)


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class MethodConfig:
    """A registered method, its hyper-parameters, and loss-term weights (paper defaults if unset)."""

    name: str = "kd"
    params: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class CallbackConfig:
    """A registered training callback (`kdlab list callbacks`) and its options."""

    name: str = "temperature_schedule"
    params: dict[str, Any] = field(default_factory=dict)


STRATEGIES = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp2")


@dataclass
class RuntimeConfig:
    """Where and how a run executes. Not part of the config hash: it changes no result beyond
    floating-point summation order (thread count, device, strategy, process count)."""

    runs_dir: str = "runs"
    accelerator: str = "auto"
    # Processes per node and nodes (kdlab/distributed.py); None: the Slurm job step's under srun,
    # else 1. ``data.batch_size`` is the global batch, split evenly over them.
    devices: int | None = None
    num_nodes: int | None = None
    strategy: str = "auto"  # auto | ddp | deepspeed_stage_2 | deepspeed_stage_3 | fsdp2
    threads: int | None = None
    # Deterministic kernels (cuDNN, cuBLAS, scatter): bit-exact resumes and repeats on GPUs too, at
    # some speed; CPU runs are deterministic either way.
    deterministic: bool = False
    wandb: str = "auto"  # auto | online | offline | disabled
    wandb_project: str = "kdlab"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)  # added to kdlab's own (stage, scheme, ...)
    # The keys a table or sweep varies, dotted key -> value (kdlab/wandb_ablation.py): logged as
    # top-level W&B config so parallel coordinates and grouping can use them.
    wandb_sweep: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown runtime.strategy '{self.strategy}' (valid: {', '.join(STRATEGIES)})")
        for name in ("devices", "num_nodes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"runtime.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class ExperimentConfig:
    """One experiment: a (teacher, student, method, scheme) on a dataset with one seed."""

    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    scheme: str = "offline"
    # The scheme's own options (`kdlab list schemes` shows them): e.g. ``{combine: probs}`` for
    # multi_teacher, ``{assistants: [...]}`` for assistant.
    scheme_params: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # Several teachers (multi_teacher): each entry is what differs from ``teacher`` above, e.g.
    # ``[{}, {}, {model: {kwargs: {channels: 32}}}]`` for two of it (other seeds) and a wider one.
    # Empty: the one ``teacher``.
    teachers: list[dict[str, Any]] = field(default_factory=list)
    method: MethodConfig = field(default_factory=MethodConfig)
    # Callbacks of the student's training: temperature schedules, curriculum temperature (CTKD).
    callbacks: list[CallbackConfig] = field(default_factory=list)
    # Per-method settings of this experiment, applied when ``method.name`` selects that method
    # (below command-line overrides): e.g. ``{ft: {params: {init_lr: 0.01}}, dkd: {params: {beta: 6}}}``
    # for the settings a paper's authors used on one teacher/student pair.
    method_presets: dict[str, MethodConfig] = field(default_factory=dict)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _one_line(error: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn OmegaConf's multi-line error into ``<source>: <full key>: <first line>``."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    key = getattr(error, "full_key", None)
    where = f"'{key}'" if key else "config"
    return ConfigError(f"{source}: bad {where}: {first}")


@functools.cache
def _schema() -> DictConfig:
    """The typed defaults, built once (OmegaConf.merge copies its inputs, so it is never mutated)."""
    return OmegaConf.structured(ExperimentConfig)


def build_config(layers: list[tuple[str, dict[str, Any]]], overrides: list[str] = ()) -> ExperimentConfig:
    """Merge YAML layers (lowest first, each with a name for errors) and dotted overrides.

    All at once first (one merge is several times faster than one per layer, which matters to a
    table planning hundreds of cells); only when that fails, layer by layer, to name the culprit."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"bad override '{override}': expected dotted.key=value")
    try:
        parts = [OmegaConf.create(layer) for _, layer in layers]
        merged = OmegaConf.merge(_schema(), *parts, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException:
        merged = _merge_naming_the_culprit(layers, overrides)
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _one_line(error, "config") from None
    assert isinstance(config, ExperimentConfig)
    return config


def _merge_naming_the_culprit(layers: list[tuple[str, dict[str, Any]]], overrides: list[str]) -> DictConfig:
    merged = _schema()
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        except OmegaConfBaseException as error:
            raise _one_line(error, source) from None
    for override in overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _one_line(error, f"override '{override}'") from None
    return merged


def resolved_teachers(config: ExperimentConfig) -> list[TeacherConfig]:
    """The experiment's teachers: each ``teachers`` entry merged over ``teacher`` (typed)."""
    if not config.teachers:
        return [config.teacher]
    base = OmegaConf.structured(config.teacher)
    resolved = []
    for index, entry in enumerate(config.teachers):
        try:
            merged = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(dict(entry))))
        except OmegaConfBaseException as error:
            raise _one_line(error, f"teachers[{index}]") from None
        assert isinstance(merged, TeacherConfig)
        resolved.append(merged)
    return resolved


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML and loggers)."""
    return asdict(config)


def spec_dict(config: Any) -> dict[str, Any]:
    """The nested dict of a config dataclass that goes into a run's hashed spec: like ``asdict``
    but without :data:`ADDED_OPTION` fields that hold their default."""
    result: dict[str, Any] = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.metadata.get("omit_from_spec_at_default") and value == _default(item):
            continue
        result[item.name] = spec_dict(value) if is_dataclass(value) else copy.deepcopy(value)
    return result


def _default(item: Any) -> Any:
    return item.default_factory() if item.default_factory is not MISSING else item.default


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def config_hash(data: dict[str, Any]) -> str:
    """Short stable hash of a plain config dict: equal configs share a run directory."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a file that is not one is a one-line error naming the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
