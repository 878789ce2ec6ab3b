"""``kdlab run`` for ``kind: lm`` experiments: plan (validate everything, train nothing), then
teacher -> (teacher generations | soft-label store) -> student, each a run folder that is reused
when finished and resumed when interrupted.

The trained student is written with ``save_pretrained`` (``<run>/hf``, LoRA merged) beside the
byte tokenizer, so ``AutoModelForCausalLM.from_pretrained`` loads it offline anywhere.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config import TrainConfig, spec_dict
from kdlab.data.text import create_text_datamodule
from kdlab.distributed import check_runtime, is_global_zero, strategy_name
from kdlab.errors import ConfigError
from kdlab.files import atomic_write_bytes
from kdlab.lm.config import DistillConfig, LMExperimentConfig
from kdlab.lm.generation import batch_prompts, sample_continuations
from kdlab.lm.models import (
    build_lm,
    check_vocabularies,
    count_parameters,
    load_tokenizer,
    merge_for_export,
    save_student,
)
from kdlab.lm.system import LMDistillation, TokenTranslation
from kdlab.loggers import log_summary, wandb_mode
from kdlab.losses.lm import LM_LOSSES, lm_loss
from kdlab.pipeline import execute_run
from kdlab.runs import Run, check_checkpoint
from kdlab.training import fit_and_test

TEACHER_SEED_OFFSET = 1_000_003
SHARDED = ("deepspeed_stage_3", "fsdp2")


@dataclass
class LMPlan:
    """Everything an LM run needs, validated."""

    config: LMExperimentConfig
    datamodule: Any
    tokenizer: Any
    student: nn.Module
    student_run: Run
    teacher: nn.Module | None = None
    teacher_tokenizer: Any = None
    teacher_run: Run | None = None
    teacher_seed: int = 0
    translation: TokenTranslation | None = None
    generations_run: Run | None = None
    store_run: Run | None = None

    def stage_run(self, stage: str) -> Run | None:
        """The run a table cell of this stage reports: ``teacher`` or ``student``."""
        return self.teacher_run if stage == "teacher" else self.student_run

    @property
    def method_name(self) -> str:
        """What ``kdlab table --only`` selects rows by."""
        return "sft" if self.config.distill.loss == "none" else self.config.distill.loss


def plan_lm(config: LMExperimentConfig) -> LMPlan:
    """Check every part of ``config`` and build it, without training or writing anything."""
    distill = config.distill
    _check_loss(distill)
    _check_recipe(config)
    wandb_mode(config.runtime.wandb)
    check_runtime(config.runtime, config.data.batch_size)
    tokenizer = load_tokenizer(config.student.model)
    datamodule = _datamodule(config, tokenizer)
    student = build_lm(config.student.model, vocab_size=len(tokenizer), seed=config.seed)
    teacher_seed = config.teacher.seed if config.teacher.seed is not None else config.seed + TEACHER_SEED_OFFSET
    data = data_spec(config)
    plan = LMPlan(config, datamodule, tokenizer, student, Run(Path(), {}), teacher_seed=teacher_seed)
    if distill.needs_teacher:
        plan.teacher_tokenizer = load_tokenizer(config.teacher.model)
        plan.teacher = build_lm(config.teacher.model, vocab_size=len(plan.teacher_tokenizer), seed=teacher_seed)
        vocabulary_map = check_vocabularies(
            plan.teacher_tokenizer,
            tokenizer,
            _vocab_size(plan.teacher),
            _vocab_size(student),
            mapping=distill.vocab_mapping,
        )
        if vocabulary_map is not None:
            plan.translation = TokenTranslation(vocabulary_map, _vocab_size(student))
        teacher_spec = {
            "stage": "lm-teacher",
            "seed": teacher_seed,
            "data": data,
            "model": asdict(config.teacher.model),
            "train": spec_dict(config.teacher.train) if config.teacher.trained else None,
        }
        plan.teacher_run = Run.for_spec(config.runtime.runs_dir, "lm-teachers", teacher_spec)
    student_spec: dict[str, Any] = {
        "stage": "lm-student",
        "seed": config.seed,
        "data": data,
        "student": {"model": asdict(config.student.model), "train": spec_dict(config.student.train)},
        "distill": asdict(distill),
        "teacher": plan.teacher_run.hash if plan.teacher_run else None,
    }
    if distill.data == "teacher_generations":
        spec = {"teacher": plan.teacher_run.hash, "data": data, "generation": asdict(distill.generation)}  # type: ignore[union-attr]
        plan.generations_run = Run.for_spec(config.runtime.runs_dir, "lm-generations", spec)
    if config.store.source == "cache":
        store = {k: v for k, v in asdict(config.store).items() if k != "path"}
        spec = {"teacher": plan.teacher_run.hash, "data": data, "store": store, "temperature": distill.temperature}  # type: ignore[union-attr]
        plan.store_run = Run.for_spec(config.runtime.runs_dir, "lm-stores", spec)
        student_spec["store"] = store
    plan.student_run = Run.for_spec(config.runtime.runs_dir, "lm-students", student_spec)
    _dry_run(plan)
    return plan


def data_spec(config: LMExperimentConfig) -> dict[str, Any]:
    """What in the data changes a result (not the loader's workers or evaluation batch)."""
    data = asdict(config.data)
    return {k: v for k, v in data.items() if k not in ("num_workers", "eval_batch_size")}


def _check_loss(distill: DistillConfig) -> None:
    if distill.loss != "none":
        if distill.loss not in LM_LOSSES:
            from kdlab.errors import unknown

            raise unknown("distillation loss (distill.loss)", distill.loss, [*LM_LOSSES, "none"])
        probe = torch.zeros(1, 2, 3)
        try:
            lm_loss(distill.loss, probe, probe, None, distill.temperature, **distill.params)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"distill.params of loss '{distill.loss}': {error}") from None
    elif distill.params:
        raise ConfigError(f"distill.params {dict(distill.params)} given, but distill.loss is 'none'")
    if distill.loss == "none" and distill.on_policy > 0:
        raise ConfigError("distill.on_policy needs a distillation loss to score the student's generations")
    if distill.loss == "none" and distill.sft_weight == 0 and distill.data == "dataset":
        raise ConfigError("distill.loss is 'none' and distill.sft_weight is 0: nothing to train on")


def _check_recipe(config: LMExperimentConfig) -> None:
    distill, store = config.distill, config.store
    for role, train in (("teacher", config.teacher.train), ("student", config.student.train)):
        if train.optimizer.sam != "none" or train.mix.enabled:
            raise ConfigError(f"{role}.train: SAM and mixup are image-classification options, not for LM runs")
    if store.source == "cache":
        if distill.loss != "forward_kl":
            raise ConfigError(
                f"store.source=cache stores sparse teacher targets, which define forward_kl only, not '{distill.loss}'"
            )
        if distill.on_policy > 0 or distill.data == "teacher_generations":
            raise ConfigError(
                "store.source=cache covers the dataset's tokens; on-policy or generated data need the teacher"
            )
        if distill.vocab_mapping is not None:
            raise ConfigError("store.source=cache with distill.vocab_mapping is not supported")
    if strategy_name(config.runtime) in SHARDED and distill.on_policy > 0:
        raise ConfigError(
            f"distill.on_policy samples from the student, which runtime.strategy={config.runtime.strategy} "
            "shards; use ddp or one process"
        )


def _datamodule(config: LMExperimentConfig, tokenizer: Any) -> Any:
    data = config.data
    return create_text_datamodule(
        data.source,
        tokenizer=tokenizer,
        path=data.path,
        block_size=data.block_size,
        batch_size=data.batch_size,
        eval_batch_size=data.eval_batch_size,
        seed=config.seed,
        num_workers=data.num_workers,
        **data.options,
    )


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _dry_run(plan: LMPlan) -> None:
    """Two short sequences through both models and the loss: shapes and vocabularies agree."""
    plan.datamodule.setup("fit")
    batch = next(iter(plan.datamodule.val_dataloader()))
    batch = {k: v[:2, :16] if v.dim() == 2 else v[:2] for k, v in batch.items() if torch.is_tensor(v)}
    batch["labels"][:, 0] = batch["input_ids"][:, 1]  # at least one target in the probe
    if plan.teacher is None or plan.config.distill.loss == "none":  # seqKD: the teacher only generates
        return
    system = build_lm_system(plan, plan.config.distill, plan.config.student.train, plan.student, plan.teacher, None)
    with torch.no_grad():
        system.kd_term(torch.zeros(2, 16, _vocab_size(plan.student)), batch, on_policy=False)


def build_lm_system(
    plan: LMPlan, distill: DistillConfig, train: TrainConfig, student: nn.Module, teacher: nn.Module | None, store: Any
) -> LMDistillation:
    """The Lightning system around ``student`` (the teacher's own training: ``teacher=None``)."""
    return LMDistillation(
        student,
        teacher,
        distill,
        train,
        pad_token_id=int(plan.datamodule.pad_token_id),
        eos_token_id=plan.datamodule.eos_token_id,
        bytes_per_token=plan.datamodule.val_bytes_per_token,
        store=store,
        store_missing=plan.config.store.missing,
        translation=plan.translation if teacher is not None and teacher is not student else None,
        seed=plan.config.seed,
    )


# -- execution --------------------------------------------------------------------------------------
def _save_weights(path: Path, model: nn.Module) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def ensure_lm_teacher(plan: LMPlan) -> dict[str, Any]:
    """Train the teacher on the data by next-token cross-entropy (or score it as loaded)."""
    config = plan.config
    run, teacher = plan.teacher_run, plan.teacher
    assert run is not None and teacher is not None

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        recipe = config.teacher.train if config.teacher.trained else replace(config.teacher.train, epochs=0)
        supervised = DistillConfig(loss="none", sft_weight=1.0)
        teacher.requires_grad_(True).train()  # planning froze it as a teacher; here it is trained
        system = build_lm_system(plan, supervised, recipe, teacher, None, None)
        metrics, loggers = fit_and_test(
            system, plan.datamodule, run, recipe, config.runtime, plan.teacher_seed, f"{config.name}/teacher", "teacher"
        )
        if not is_global_zero(config.runtime):
            return metrics
        metrics.update(_model_metrics(teacher, config.teacher.model, started))
        _save_weights(run.model_path, teacher)
        save_student(teacher, plan.teacher_tokenizer, run.dir / "hf")
        log_summary(loggers, metrics)
        return metrics

    metrics = execute_run(run, "teacher", work, config.runtime)
    teacher.load_state_dict(check_checkpoint(run.model_path))
    teacher.requires_grad_(False).eval()
    return metrics


def _model_metrics(model: nn.Module, model_config: Any, started: float) -> dict[str, Any]:
    return {
        "params": count_parameters(model),
        "model": model_config.preset or model_config.path,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }


def ensure_generations(plan: LMPlan) -> Path:
    """Sequence-level KD's data: the teacher's sampled continuation of every training prompt,
    generated once per (teacher, data, sampling) and reused by every student."""
    config, run, teacher = plan.config, plan.generations_run, plan.teacher
    assert run is not None and teacher is not None
    path = run.dir / "generations.pt"

    def work() -> dict[str, Any]:
        if not is_global_zero(config.runtime):
            return {}
        started = time.perf_counter()
        torch.manual_seed(plan.teacher_seed)
        batches = []
        for batch in plan.datamodule.ordered_train_dataloader():
            prompts = batch_prompts(batch, config.distill.generation.prompt_tokens)
            generated = sample_continuations(
                teacher, prompts, config.distill.generation, plan.datamodule.pad_token_id, plan.datamodule.eos_token_id
            )
            batches.append(generated)
        samples = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        buffer = io.BytesIO()
        torch.save(samples, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return {"samples": int(samples["input_ids"].shape[0]), "wall_seconds": round(time.perf_counter() - started, 3)}

    execute_run(run, "teacher generations", work, config.runtime)
    return path


def ensure_store(plan: LMPlan) -> Any:
    """The teacher's sparse soft labels for the training split, written once, then read."""
    from kdlab.lm.store import LMSoftLabelStore, write_lm_store

    config, run, teacher = plan.config, plan.store_run, plan.teacher
    assert run is not None and teacher is not None
    path = Path(config.store.path) if config.store.path else run.dir / "store"

    def work() -> dict[str, Any]:
        if not is_global_zero(config.runtime):
            return {}
        started = time.perf_counter()
        if not path.exists():
            write_lm_store(
                teacher,
                plan.datamodule.ordered_train_dataloader(),
                path,
                mode=config.store.mode,
                k=config.store.k,
                samples=config.store.samples,
                temperature=config.distill.temperature,
                seed=config.seed,
                dtype=config.store.dtype,
                manifest={"data": data_spec(config), "teacher_run": plan.teacher_run.hash},  # type: ignore[union-attr]
            )
        return {"path": str(path), "wall_seconds": round(time.perf_counter() - started, 3)}

    execute_run(run, "soft-label store", work, config.runtime)
    store = LMSoftLabelStore(path)
    store.check_matches(data_spec(config), _vocab_size(plan.student))
    return store


def ensure_lm_student(plan: LMPlan) -> dict[str, Any]:
    """Train the student (teacher, generations and store made first), then save it for the world."""
    config, run = plan.config, plan.student_run
    distill = config.distill
    teacher = plan.teacher  # with loss none (SFT, seqKD) it only scores: agreement and KL
    store = ensure_store(plan) if config.store.source == "cache" else None
    datamodule = plan.datamodule
    if plan.generations_run is not None:
        datamodule = copy.copy(datamodule)
        datamodule.use_generated_training_set(torch.load(ensure_generations(plan), weights_only=True))

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        system = build_lm_system(plan, distill, config.student.train, plan.student, teacher, store)
        metrics, loggers = fit_and_test(
            system,
            datamodule,
            run,
            config.student.train,
            config.runtime,
            config.seed,
            f"{config.name}/student",
            "student",
        )
        if not is_global_zero(config.runtime):
            return metrics
        exported = merge_for_export(plan.student)
        metrics.update(_model_metrics(exported, config.student.model, started))
        metrics["loss"] = distill.loss
        if plan.teacher_run is not None:
            metrics["teacher_run"] = str(plan.teacher_run.dir)
        _save_weights(run.model_path, exported)
        save_student(exported, plan.tokenizer, run.dir / "hf")
        log_summary(loggers, metrics)
        return metrics

    return execute_run(run, "student", work, config.runtime)


def run_lm_stage(plan: LMPlan, stage: str) -> dict[str, Any]:
    """A table cell: the teacher's metrics, or the student's (its teacher made first)."""
    teacher_metrics = ensure_lm_teacher(plan) if plan.teacher_run is not None else None
    if stage == "teacher":
        assert teacher_metrics is not None
        return teacher_metrics
    return ensure_lm_student(plan)


def execute_lm_plan(plan: LMPlan) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Teacher (reused if finished) -> generations or store, if asked -> student."""
    teacher = ensure_lm_teacher(plan) if plan.teacher_run is not None else None
    return teacher, ensure_lm_student(plan)
