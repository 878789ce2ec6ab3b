"""Causal language models for distillation: every LM is a Hugging Face ``PreTrainedModel``.

One model type everywhere means ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained(dir)``
work offline on any machine and FSDP/DeepSpeed wrap teacher and student alike. kdlab's own small
GPT is a set of named GPT-2 presets on a byte vocabulary (ByT5's byte tokenizer, 259 ids), sized
so a teacher trains on a CPU in minutes; any local HF model directory (Llama, GPT-2, ...) works too.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from kdlab.data.byte_tokens import BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, byte_tokenizer
from kdlab.errors import ConfigError, DataNotFoundError, did_you_mean
from kdlab.files import replace_folder
from kdlab.registry import Registry

# Preset -> GPT2Config keywords. Counts are for the byte vocabulary with tied embeddings (the
# position table is counted: n_positions * n_embd); tests/test_lm_models.py checks them.
LM_PRESETS: Registry[dict[str, Any]] = Registry("LM preset")
LM_PRESETS.add(
    "gpt-tiny", dict(n_layer=2, n_embd=32, n_head=2, n_positions=256), "tests: 2 layers, d=32 (42.0K params)"
)
LM_PRESETS.add("gpt-2l", dict(n_layer=2, n_embd=128, n_head=4, n_positions=256), "CPU student: 2 layers, d=128 (463K)")
LM_PRESETS.add("gpt-6l", dict(n_layer=6, n_embd=192, n_head=6, n_positions=256), "CPU teacher: 6 layers, d=192 (2.77M)")
LM_PRESETS.add(
    "gpt-20m", dict(n_layer=6, n_embd=512, n_head=8, n_positions=1024), "GPU student: 6 layers, d=512 (19.6M params)"
)
LM_PRESETS.add(
    "gpt-100m",
    dict(n_layer=14, n_embd=768, n_head=12, n_positions=1024),
    "GPU teacher: GPT-2 small's width, 14 layers, d=768 (100.2M params on bytes)",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARED_TOKENS = "shared-tokens"


@dataclass
class LoraOptions:
    """LoRA adapters on the student (``r`` = 0: off, every weight trains)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: peft's default for the architecture (gpt2: c_attn)


@dataclass
class LMModelConfig:
    """A causal LM: exactly one of a kdlab ``preset`` or a local HF model directory ``path``.

    ``config`` overrides keys of the model's HF config (``n_layer``, ``n_positions``, ...);
    unknown keys fail rather than being silently stored on the config.
    """

    preset: str | None = None
    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    lora: LoraOptions = field(default_factory=LoraOptions)


def preset_config(name: str, vocab_size: int | None = None, overrides: dict[str, Any] | None = None) -> GPT2Config:
    """The GPT2Config of a preset (no weights built: param counts come from it cheaply)."""
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size or BYTE_VOCAB_SIZE,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    kwargs.update(LM_PRESETS.get(name))
    config = GPT2Config(**kwargs)
    _apply_overrides(config, overrides or {}, f"preset '{name}'")
    return config


def gpt2_parameter_count(config: GPT2Config) -> int:
    """Parameters of a GPT2LMHeadModel with tied embeddings, computed from its config."""
    d, layers = config.n_embd, config.n_layer
    inner = config.n_inner or 4 * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    return (config.vocab_size + config.n_positions) * d + layers * block + 2 * d + head


def _apply_overrides(config: Any, overrides: dict[str, Any], what: str) -> None:
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known:
            hint = did_you_mean(key, sorted(known))
            raise ConfigError(
                f"unknown model config key '{key}' for {what}{'; ' + hint if hint else ''}"
                f" (it must be a field of {type(config).__name__})"
            )
        setattr(config, key, value)


def _check(config: LMModelConfig) -> None:
    if (config.preset is None) == (config.path is None):
        raise ConfigError(
            f"an LM needs exactly one of model.preset or model.path (got preset={config.preset!r},"
            f" path={config.path!r}); presets: {', '.join(LM_PRESETS.names())}"
        )
    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown model dtype '{config.dtype}' (valid: {', '.join(DTYPES)})")
    if config.preset is not None and config.preset not in LM_PRESETS:
        LM_PRESETS.get(config.preset)  # raises the standard did-you-mean error
    lora = config.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise ConfigError(
            f"bad LoRA options r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}"
            " (r >= 0, 0 = off; alpha > 0; 0 <= dropout < 1)"
        )


def _model_dir(path: str) -> Path:
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise DataNotFoundError(
            f"model directory '{directory}' does not exist (kdlab never downloads; save one with save_pretrained)"
        )
    if not (directory / "config.json").is_file():
        extra = (
            " (it holds a LoRA adapter: save the merged model with kdlab.lm.models.save_student)"
            if (directory / "adapter_config.json").is_file()
            else ""
        )
        raise DataNotFoundError(f"'{directory}' has no config.json, so it is not a Hugging Face model directory{extra}")
    return directory


def build_lm(config: LMModelConfig, vocab_size: int | None = None, seed: int | None = None) -> PreTrainedModel:
    """Build a preset GPT (seeded init) or load a local HF model; wrap it in LoRA when ``lora.r`` > 0.

    ``vocab_size`` sets a preset's vocabulary (default: the 259 bytes); for a loaded model it is a
    check that the model has at least that many logits.
    """
    _check(config)
    dtype = DTYPES[config.dtype]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if config.preset is not None:
            model = GPT2LMHeadModel(preset_config(config.preset, vocab_size, config.config)).to(dtype)
        else:
            directory = _model_dir(config.path)
            hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
            _apply_overrides(hf_config, config.config, f"model '{directory}'")
            model = AutoModelForCausalLM.from_pretrained(
                directory, config=hf_config, dtype=dtype, local_files_only=True
            ).to(dtype)  # transformers < 5 ignores ``dtype=``
            logits = model.get_output_embeddings().weight.shape[0]
            if vocab_size is not None and logits < vocab_size:
                raise ConfigError(f"model '{directory}' has {logits} logits but its tokenizer has {vocab_size} tokens")
        if config.lora.r > 0:
            model = _wrap_lora(model, config.lora)
    return model


def _wrap_lora(model: PreTrainedModel, options: LoraOptions) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    model_type = model.config.model_type
    if options.target_modules is None and model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"peft has no default LoRA target modules for model type '{model_type}'; set model.lora.target_modules"
        )
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules) if options.target_modules is not None else None,
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores weights transposed
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # e.g. target modules that match nothing
        raise ConfigError(f"cannot add LoRA to '{model_type}': {str(error).splitlines()[0]}") from None


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_for_export(model: PreTrainedModel) -> PreTrainedModel:
    """Fold LoRA weights into the base model and drop the adapters (in place), so what is saved is
    a plain HF model any tool loads; a model without LoRA is returned as is."""
    return model.merge_and_unload() if is_lora(model) else model


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(config: LMModelConfig) -> PreTrainedTokenizerBase:
    """The byte tokenizer for presets, the directory's own tokenizer for a local model."""
    _check(config)
    if config.preset is not None:
        return byte_tokenizer()
    directory = _model_dir(config.path)
    # transformers 5 quietly builds an empty tokenizer from a directory without tokenizer files
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise DataNotFoundError(
            f"no tokenizer in model directory '{directory}' (none of {', '.join(_TOKENIZER_FILES)};"
            " save one there with tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataNotFoundError(
            f"no tokenizer in model directory '{directory}' ({str(error).splitlines()[0]})"
        ) from None


def save_student(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Save the student as a plain HF model (LoRA merged, safetensors) plus its tokenizer.

    Written into a temporary folder beside ``directory`` and renamed over it, so a reader never
    sees half a model. A LoRA model is merged on a copy: the training model keeps its adapters.
    Pass the unwrapped module (on one rank) when training under FSDP/DeepSpeed.
    """
    target = Path(directory).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    plain = merge_for_export(copy.deepcopy(model)) if is_lora(model) else model
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "writing shards" bar per save is noise in a run's log
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return target


# --- teacher/student vocabularies -------------------------------------------------------------


@dataclass(eq=False)
class VocabularyMap:
    """Teacher token ids and the student ids they stand for, for token-level KD across vocabularies.

    :meth:`project` keeps only the shared tokens, in the same order on both sides. The softmax of
    the projected logits renormalises over them: teacher probability mass on unmapped tokens is
    dropped, and unmapped student tokens get no teacher signal (``coverage`` says how many do).
    """

    teacher_ids: torch.Tensor  # int64 [n_shared]
    student_ids: torch.Tensor  # int64 [n_shared]
    coverage: float  # fraction of the student tokenizer's tokens that have a teacher token
    source: str  # "shared-tokens", the JSON file, or "padding" (same tokenizer, different logit counts)

    def __post_init__(self) -> None:
        n = len(self.teacher_ids)
        arange = torch.arange(n)
        same = torch.equal(self.teacher_ids.cpu(), arange) and torch.equal(self.student_ids.cpu(), arange)
        self._prefix = n if same else None  # identity on the first n ids: slice, no gather

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def project(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both logits restricted to the shared tokens, ``[..., n_shared]``, position i the same token."""
        if self._prefix is not None:
            return teacher_logits[..., : self._prefix], student_logits[..., : self._prefix]
        if self.teacher_ids.device != teacher_logits.device:
            self.teacher_ids = self.teacher_ids.to(teacher_logits.device)
        if self.student_ids.device != student_logits.device:
            self.student_ids = self.student_ids.to(student_logits.device)
        return teacher_logits.index_select(-1, self.teacher_ids), student_logits.index_select(-1, self.student_ids)

    def teacher_mass(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's probability on mapped tokens (1 - what :meth:`project` drops), per position."""
        probs = teacher_logits.float().softmax(-1)
        if self._prefix is not None:
            return probs[..., : self._prefix].sum(-1)
        return probs.index_select(-1, self.teacher_ids.to(probs.device)).sum(-1)


def check_vocabularies(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_vocab_size: int,
    student_vocab_size: int,
    mapping: str | None = None,
) -> VocabularyMap | None:
    """None when teacher and student logits line up id for id; else the map to use, or an error.

    The vocab sizes are the models' logit counts, which may be padded past the tokenizer (GPT-2
    style; the extra ids are never targets). Same tokenizer and same logit count: None. Same
    tokenizer, different padding: a map over the tokenizer's ids. Different tokenizers: a
    ConfigError saying how they differ unless ``mapping`` is given: ``"shared-tokens"`` (tokens
    whose strings are identical, e.g. single characters; "Ġthe" and "▁the" do not match) or a
    JSON file ``{teacher_id: student_id}``.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    for side, vocab, size in (
        ("teacher", teacher_vocab, teacher_vocab_size),
        ("student", student_vocab, student_vocab_size),
    ):
        top = max(vocab.values(), default=-1) + 1
        if top > size:
            raise ConfigError(
                f"the {side} tokenizer has ids up to {top - 1} but the {side} model only {size} logits"
                " (resize its token embeddings)"
            )
    if mapping is not None:
        return _mapping(mapping, teacher_vocab, student_vocab, teacher_vocab_size, student_vocab_size)
    if teacher_vocab == student_vocab:
        if teacher_vocab_size == student_vocab_size:
            return None
        ids = torch.arange(max(teacher_vocab.values()) + 1)
        return VocabularyMap(ids, ids.clone(), 1.0, "padding")
    raise ConfigError(_difference(teacher_vocab, student_vocab, teacher_vocab_size, student_vocab_size))


def _difference(teacher: dict[str, int], student: dict[str, int], teacher_size: int, student_size: int) -> str:
    shared = teacher.keys() & student.keys()
    moved = sorted((t for t in shared if teacher[t] != student[t]), key=teacher.__getitem__)
    only_teacher = sorted(teacher.keys() - shared, key=teacher.__getitem__)
    only_student = sorted(student.keys() - shared, key=student.__getitem__)

    def examples(tokens: list[str], show: Any) -> str:
        return f" (e.g. {', '.join(show(t) for t in tokens[:3])})" if tokens else ""

    return (
        f"teacher and student vocabularies differ: teacher tokenizer {len(teacher)} tokens ({teacher_size} logits),"
        f" student {len(student)} ({student_size} logits); {len(shared)} token strings are shared, {len(moved)} of"
        f" them with different ids"
        + examples(moved, lambda t: f"{t!r} teacher {teacher[t]} student {student[t]}")
        + f"; {len(only_teacher)} teacher tokens are not in the student's vocabulary"
        + examples(only_teacher, repr)
        + f"; {len(only_student)} student tokens are not in the teacher's"
        + examples(only_student, repr)
        + ". Token-level KD would compare different tokens: give an explicit mapping,"
        + f" distill.vocab_mapping='{SHARED_TOKENS}' (same token strings) or a JSON file {{teacher_id: student_id}}"
    )


def _mapping(
    mapping: str, teacher: dict[str, int], student: dict[str, int], teacher_size: int, student_size: int
) -> VocabularyMap:
    if mapping == SHARED_TOKENS:
        pairs = sorted((teacher[t], student[t]) for t in teacher.keys() & student.keys())
        source = SHARED_TOKENS
    else:
        pairs = _read_mapping(mapping, teacher_size, student_size)
        source = str(mapping)
    if not pairs:
        raise ConfigError(f"vocabulary mapping '{mapping}' maps no teacher token to a student token")
    student_ids = [s for _, s in pairs]
    if len(set(student_ids)) != len(student_ids):
        twice = next(s for s in student_ids if student_ids.count(s) > 1)
        raise ConfigError(f"vocabulary mapping '{mapping}' maps several teacher tokens to student id {twice}")
    coverage = len(pairs) / max(len(student), 1)
    teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    return VocabularyMap(teacher_ids, torch.tensor(student_ids, dtype=torch.long), coverage, source)


def _read_mapping(mapping: str, teacher_size: int, student_size: int) -> list[tuple[int, int]]:
    path = Path(mapping).expanduser()
    if not path.is_file():
        raise DataNotFoundError(
            f"vocabulary mapping '{mapping}' is neither '{SHARED_TOKENS}' nor an existing JSON file"
            " {teacher_id: student_id}"
        )
    try:
        raw = json.loads(path.read_text())
        pairs = sorted((int(t), int(s)) for t, s in raw.items())
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"vocabulary mapping '{path}' is not a JSON object of integer ids ({error})") from None
    for teacher_id, student_id in pairs:
        if not (0 <= teacher_id < teacher_size and 0 <= student_id < student_size):
            raise ConfigError(
                f"vocabulary mapping '{path}' maps teacher id {teacher_id} to student id {student_id}, outside"
                f" the models' vocabularies (teacher 0..{teacher_size - 1}, student 0..{student_size - 1})"
            )
    return pairs


# --- description --------------------------------------------------------------------------------


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters (tied embeddings once); ``trainable_only`` counts what the optimizer updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def lm_describe(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture, sizes and context of an LM, for metrics and run summaries."""
    config = model.config
    output = model.get_output_embeddings()
    vocab = output.weight.shape[0] if output is not None else config.vocab_size
    params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    description: dict[str, Any] = {
        "arch": config.model_type,
        "params": params,
        "trainable_params": trainable,
        "vocab": int(vocab),
        "context": getattr(config, "max_position_embeddings", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "d_model": getattr(config, "hidden_size", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "lora_r": _lora_rank(model),
    }
    return description


def _lora_rank(model: torch.nn.Module) -> int:
    if not is_lora(model):
        return 0
    return int(next(iter(model.peft_config.values())).r)
