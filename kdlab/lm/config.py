"""Typed configs of language-model distillation experiments (``kind: lm`` YAML files).

The same rules as :mod:`kdlab.config`: the dataclasses are the schema, OmegaConf merges YAML
layers and dotted overrides, and an unknown or ill-typed key fails before anything trains. The
training recipe (optimiser, schedule, epochs, precision) is the shared :class:`TrainConfig`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlab.config import OptimizerConfig, RuntimeConfig, ScheduleConfig, TrainConfig, _one_line
from kdlab.errors import ConfigError
from kdlab.lm.models import LMModelConfig

LM_KIND = "lm"
DISTILL_DATA = ("dataset", "teacher_generations")
STORE_SOURCES = ("model", "cache")
STORE_MODES = ("topk", "sample")
STORE_MISSING = ("residual", "renormalize")
STORE_DTYPES = ("float16", "float32")


def _lm_recipe(epochs: int, lr: float) -> TrainConfig:
    """AdamW with a cosine decay: the usual small-transformer recipe (SGD's CIFAR defaults are not).
    LM runs step every schedule per optimiser step, at fractional epochs (kdlab/lm/system.py)."""
    return TrainConfig(
        epochs=epochs,
        optimizer=OptimizerConfig(name="adamw", lr=lr, weight_decay=0.01),
        schedule=ScheduleConfig(name="cosine", milestones=[], warmup_epochs=0),
        gradient_clip_val=1.0,
    )


@dataclass
class LMDataConfig:
    """The text (see :func:`kdlab.data.text.create_text_datamodule`): ``stdlib`` (the Python
    standard library's own sources), ``folder`` (any local text folder at ``path``), ``jsonl``
    (prompt/response pairs at ``path``) or ``stdlib-functions`` (pairs cut from the stdlib)."""

    source: str = "stdlib"
    path: str | None = None
    block_size: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0
    # Source options: max_train_bytes, max_val_bytes, val_fraction, patterns, max_length, ...
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMTeacherConfig:
    """The teacher: trained here on the data by next-token cross-entropy, or (``trained: false``)
    used as loaded, e.g. a pretrained Hugging Face model from a local ``model.path``."""

    model: LMModelConfig = field(default_factory=lambda: LMModelConfig(preset="gpt-6l"))
    train: TrainConfig = field(default_factory=lambda: _lm_recipe(4, 3e-3))
    trained: bool = True
    seed: int | None = None  # None: the experiment's seed plus an offset


@dataclass
class LMStudentConfig:
    model: LMModelConfig = field(default_factory=lambda: LMModelConfig(preset="gpt-2l"))
    train: TrainConfig = field(default_factory=lambda: _lm_recipe(4, 3e-3))


@dataclass
class GenerationConfig:
    """Sampling for sequence-level KD (the teacher's continuations) and on-policy batches (the
    student's)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    # Byte-corpus blocks have no prompt: the first ``prompt_tokens`` of each block are one.
    prompt_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.prompt_tokens < 1:
            raise ConfigError(
                f"generation.max_new_tokens and prompt_tokens must be >= 1, got {self.max_new_tokens}, "
                f"{self.prompt_tokens}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature must be positive, got {self.temperature}")


@dataclass
class DistillConfig:
    """What the student learns from.

    ``loss``: a token-level divergence of :mod:`kdlab.losses.lm` (forward_kl, reverse_kl,
    generalized_jsd, skew_forward_kl, skew_reverse_kl, tvd) with ``params`` (beta, alpha), or
    ``none``: supervised fine-tuning on the data alone (the baseline; no teacher is needed).
    ``sft_weight`` adds next-token cross-entropy on the data's own targets. ``data``: train on
    the dataset, or on the teacher's generations (sequence-level KD, Kim & Rush 2016).
    ``on_policy``: GKD's lambda, the chance that a training batch is replaced by the student's
    own generations from the batch's prompts, scored by the teacher (Agarwal et al. 2024).
    """

    loss: str = "forward_kl"
    params: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    kd_weight: float = 1.0
    sft_weight: float = 0.0
    data: str = "dataset"
    on_policy: float = 0.0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Token rows per chunk of the loss (None: the loss's default; see kdlab.losses.lm).
    chunk_size: int | None = None
    # Teacher and student vocabularies differ: a JSON file {teacher_id: student_id} or
    # "shared-tokens"; without one, a mismatch is an error.
    vocab_mapping: str | None = None
    # Plan the teacher even where the loss does not need it (the SFT baseline of a table), so the
    # student's agreement with it and KL from it are reported too.
    compare_with_teacher: bool = False

    def __post_init__(self) -> None:
        if self.data not in DISTILL_DATA:
            raise ConfigError(f"unknown distill.data '{self.data}' (valid: {', '.join(DISTILL_DATA)})")
        if not 0.0 <= self.on_policy <= 1.0:
            raise ConfigError(f"distill.on_policy is a probability, got {self.on_policy}")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature must be positive, got {self.temperature}")
        if self.kd_weight < 0 or self.sft_weight < 0:
            raise ConfigError(f"distill weights must be >= 0, got kd {self.kd_weight}, sft {self.sft_weight}")

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "none" or self.data == "teacher_generations" or self.compare_with_teacher


@dataclass
class LMStoreConfig:
    """Where the student reads the teacher's token distributions: its forward pass every step
    (``model``) or a sparse soft-label store written once (``cache``, kdlab/lm/store.py): the
    top-``k`` log-probs per token with the missing mass as its own bucket, or ``sample``: the
    unbiased random-sampling estimate of Anshumann et al. (ACL 2025) from ``samples`` draws."""

    source: str = "model"
    mode: str = "topk"
    k: int = 8
    samples: int = 16
    missing: str = "residual"
    dtype: str = "float16"  # the stored log-probs: float16, or float32 (exact top-k targets)
    path: str | None = None  # None: a folder under the runs directory, keyed by teacher and data

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("source", self.source, STORE_SOURCES),
            ("mode", self.mode, STORE_MODES),
            ("missing", self.missing, STORE_MISSING),
            ("dtype", self.dtype, STORE_DTYPES),
        ):
            if value not in valid:
                raise ConfigError(f"unknown store.{name} '{value}' (valid: {', '.join(valid)})")
        if self.k < 1 or self.samples < 1:
            raise ConfigError(f"store.k and store.samples must be >= 1, got {self.k}, {self.samples}")


@dataclass
class LMExperimentConfig:
    """One language-model distillation experiment: a teacher, a student, a loss, one seed."""

    kind: str = LM_KIND
    name: str = "unnamed"
    description: str = ""
    seed: int = 0
    data: LMDataConfig = field(default_factory=LMDataConfig)
    teacher: LMTeacherConfig = field(default_factory=LMTeacherConfig)
    student: LMStudentConfig = field(default_factory=LMStudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    store: LMStoreConfig = field(default_factory=LMStoreConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@functools.cache
def _schema() -> DictConfig:
    return OmegaConf.structured(LMExperimentConfig)


def build_lm_config(layers: list[tuple[str, dict[str, Any]]], overrides: list[str] = ()) -> LMExperimentConfig:
    """Merge YAML layers (lowest first) and dotted overrides into a typed config; errors name the
    layer or override at fault."""
    merged = _schema()
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        except OmegaConfBaseException as error:
            raise _one_line(error, source) from None
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"bad override '{override}': expected dotted.key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _one_line(error, f"override '{override}'") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _one_line(error, "config") from None
    assert isinstance(config, LMExperimentConfig)
    return config
