"""``kdlab run``: plan (validate everything, train nothing), then teacher -> calibration -> student.

Planning builds every part once on a two-sample dry run, so a bad name, option, layer or class
count fails in seconds with one line, before any run folder is touched.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from kdlab.config import ExperimentConfig, ScheduleConfig, TeacherConfig, TrainConfig
from kdlab.data import ClassificationDataModule, create_datamodule
from kdlab.errors import CheckpointError, ConfigError, KdlabError
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.files import atomic_write_bytes, atomic_write_json, file_sha256
from kdlab.loggers import log_summary, wandb_mode
from kdlab.methods import METHODS, Method, create_method, resolve_weights
from kdlab.methods.registry import resolved_params
from kdlab.models import count_parameters, create_model
from kdlab.optim import OPTIMIZERS, SCHEDULES
from kdlab.plots import reliability_diagram
from kdlab.runs import TEACHER_GROUP, Run, check_checkpoint
from kdlab.schemes import SCHEMES, FrozenTeacher
from kdlab.teachers.calibration import CALIBRATORS, calibration_report, collect_logits
from kdlab.training import fit_and_test

MODEL_FILE_FORMAT = "kdlab-model/1"
TEACHER_SEED_OFFSET = 1_000_003


@dataclass
class Plan:
    """Everything a run needs, validated; ``teacher_run`` is None when the method needs no teacher."""

    config: ExperimentConfig
    datamodule: ClassificationDataModule
    student: nn.Module
    method: Method
    weights: dict[str, float]
    student_run: Run
    teacher_run: Run | None
    teacher: nn.Module | None


def plan_experiment(config: ExperimentConfig) -> Plan:
    """Check every part of ``config`` and build it, without training or writing anything."""
    SCHEMES.get(config.scheme)
    wandb_mode(config.runtime.wandb)
    method_cls = METHODS.get(config.method.name)
    weights = resolve_weights(method_cls, config.method.weights)
    method = create_method(config.method)
    datamodule = create_datamodule(config.data, config.seed)
    _check_recipe("student", config.student.train)

    student = _build("student", config.student.model.name, config.student.model.kwargs, datamodule, config.seed)
    teacher: nn.Module | None = None
    teacher_run: Run | None = None
    if method_cls.needs_teacher:
        if config.teacher.checkpoint is None:
            _check_recipe("teacher", config.teacher.train)
        if config.teacher.calibration.method != "none":
            CALIBRATORS.get(config.teacher.calibration.method)
        teacher = _build("teacher", config.teacher.model.name, config.teacher.model.kwargs, datamodule, config.seed)
        if config.teacher.checkpoint is not None:
            load_model_weights(teacher, Path(config.teacher.checkpoint))
        teacher_run = Run.for_spec(config.runtime.runs_dir, TEACHER_GROUP, teacher_spec(config))
    _dry_run(student, teacher, method, datamodule)

    spec = student_spec(config, teacher_run, resolved_params(method_cls, config.method.params), weights)
    student_run = Run.for_spec(config.runtime.runs_dir, config.name, spec)
    for run in (teacher_run, student_run):
        if run is not None and not run.is_finished():
            run.resumable_checkpoint()
    return Plan(config, datamodule, student, method, weights, student_run, teacher_run, teacher)


def teacher_spec(config: ExperimentConfig) -> dict[str, Any]:
    """What determines a teacher: shared by every student whose experiment resolves to it."""
    teacher: TeacherConfig = config.teacher
    spec: dict[str, Any] = {
        "stage": "teacher",
        "seed": config.seed,
        "data": data_spec(config),
        "model": asdict(teacher.model),
        "calibration": asdict(teacher.calibration),
    }
    if teacher.checkpoint is None:
        spec["train"] = asdict(teacher.train)
    else:
        path = Path(teacher.checkpoint).resolve()
        spec["checkpoint"] = {"path": str(path), "sha256": file_sha256(path)}
    return spec


def student_spec(
    config: ExperimentConfig, teacher_run: Run | None, params: dict[str, Any], weights: dict[str, float]
) -> dict[str, Any]:
    """The whole experiment minus what never changes the numbers (runtime, description), with the
    method's parameters and weights resolved, so a changed code default is a new run, not a reuse."""
    spec: dict[str, Any] = {
        "stage": "student",
        "seed": config.seed,
        "scheme": config.scheme,
        "data": data_spec(config),
        "student": asdict(config.student),
        "method": {"name": config.method.name, "params": params, "weights": weights},
    }
    if teacher_run is not None:
        spec["teacher"] = {
            "run": teacher_run.hash,
            "use_calibrated_logits": config.teacher.use_calibrated_logits,
        }
    return spec


def data_spec(config: ExperimentConfig) -> dict[str, Any]:
    """The data config minus where the files live, which never changes a result."""
    return {key: value for key, value in asdict(config.data).items() if key != "root"}


def _check_recipe(role: str, train: TrainConfig) -> None:
    OPTIMIZERS.get(train.optimizer.name)
    SCHEDULES.get(train.schedule.name)
    if train.epochs < 1:
        raise ConfigError(f"{role}.train.epochs must be at least 1, got {train.epochs}")


def _build(role: str, name: str, kwargs: dict[str, Any], datamodule: ClassificationDataModule, seed: int) -> nn.Module:
    """Build a model for the dataset's class count; same seed, same initial weights. Teachers draw
    from another stream, so a student never starts from its teacher's initial weights."""
    kwargs = dict(kwargs)
    kwargs.setdefault("num_classes", datamodule.num_classes)
    torch.manual_seed(seed if role == "student" else seed + TEACHER_SEED_OFFSET)
    try:
        return create_model(name, **kwargs)
    except KdlabError as error:
        raise type(error)(f"{role}: {error}") from None


@torch.no_grad()
def _dry_run(
    student: nn.Module, teacher: nn.Module | None, method: Method, datamodule: ClassificationDataModule
) -> None:
    """Two fake samples through every part: shapes, class counts and layer names agree."""
    sample = torch.zeros(2, *datamodule.input_shape)
    outputs: dict[str, ModelOutput] = {}
    for role, model, taps in (
        ("student", student, method.student_taps),
        ("teacher", teacher, method.teacher_taps),
    ):
        if model is None:
            continue
        hooks = FeatureTaps(model, taps, role=role)
        was_training = model.training
        model.eval()
        try:
            outputs[role] = tapped_forward(model, hooks, sample)
        except RuntimeError as error:
            raise ConfigError(
                f"{role} model {type(model).__name__} cannot take {type(datamodule).__name__} inputs"
                f" of shape {list(datamodule.input_shape)}: {str(error).splitlines()[0]}"
            ) from None
        finally:
            hooks.remove()
            model.train(was_training)
        classes = outputs[role].logits.shape[-1]
        if classes != datamodule.num_classes:
            raise ConfigError(
                f"num_classes mismatch: {role} outputs {classes} classes but the dataset has {datamodule.num_classes}"
            )
    method.setup(outputs["student"], outputs.get("teacher"), datamodule.data_info())
    _try_method(method, outputs["student"], outputs.get("teacher"), sample)


def _try_method(method: Method, student: ModelOutput, teacher: ModelOutput | None, sample: torch.Tensor) -> None:
    """Compute the method's terms once on the dry-run outputs, so features it cannot use (a flat
    vector where it needs a map, say) fail now, not after the teacher has trained. The method's
    state (memory banks, running estimates) is put back afterwards."""
    batch = {"input": sample, "target": torch.zeros(len(sample), dtype=torch.long), "index": torch.arange(len(sample))}
    state = copy.deepcopy(method.state_dict())
    was_training = method.training
    method.eval()
    try:
        method(student, teacher, batch)
        if method.init_epochs:
            method.init_loss(student, teacher, batch)
    except (ValueError, RuntimeError, IndexError) as error:
        raise ConfigError(
            f"method '{method.name}' cannot use these models' features: {str(error).splitlines()[0]}"
        ) from None
    finally:
        method.load_state_dict(state)
        method.train(was_training)


def load_model_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a kdlab ``model.pt``, a Lightning checkpoint of a kdlab run, or a bare state dict."""
    payload = check_checkpoint(path)
    if isinstance(payload, dict) and payload.get("format") == MODEL_FILE_FORMAT:
        state = payload["state_dict"]
    elif isinstance(payload, dict) and "state_dict" in payload:
        state = {k.removeprefix("student."): v for k, v in payload["state_dict"].items() if k.startswith("student.")}
        state = state or payload["state_dict"]
    elif isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state = payload["model"]
    elif isinstance(payload, dict):
        state = payload
    else:
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not model weights")
    result = model.load_state_dict(state, strict=False)
    mismatch = [*result.missing_keys, *result.unexpected_keys]
    if mismatch:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: missing {result.missing_keys[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    return payload if isinstance(payload, dict) else {}


def save_model(path: Path, model: nn.Module, name: str, kwargs: dict[str, Any], **extra: Any) -> None:
    """The trained model alone, atomically: what students load and what export will read."""
    buffer = io.BytesIO()
    torch.save(
        {
            "format": MODEL_FILE_FORMAT,
            "model": name,
            "kwargs": kwargs,
            "state_dict": model.state_dict(),
            **extra,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def _execute(run: Run, label: str, work: Any) -> dict[str, Any]:
    """Reuse a finished run, else run ``work`` under the run's lock with status bookkeeping."""
    with run.lock():
        if run.is_finished():
            print(f"[kdlab] {label}: reusing finished run {run.dir}")
            return run.metrics()
        run.prepare()
        run.set_status("running")
        print(f"[kdlab] {label}: {run.dir}")
        try:
            metrics = work()
        except BaseException as error:
            run.set_status("failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
            raise
        run.finish(metrics)
        return metrics


def ensure_teacher(plan: Plan) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load) and calibrate the teacher unless a finished run with its config exists."""
    config, run = plan.config, plan.teacher_run
    assert run is not None and plan.teacher is not None
    teacher = plan.teacher

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        metrics: dict[str, Any] = {}
        loggers: list[Any] = []
        if config.teacher.checkpoint is None:
            system = SCHEMES.get("offline")(
                student=teacher,
                method=METHODS.get("ce")(),
                weights={"ce": 1.0},
                train=config.teacher.train,
                num_classes=plan.datamodule.num_classes,
                calibration_bins=config.teacher.calibration.bins,
            )
            metrics, loggers = fit_and_test(
                system,
                plan.datamodule,
                run,
                config.teacher.train,
                config.runtime,
                config.seed,
                f"{config.name}/teacher",
                "teacher",
            )
        metrics.update(calibrate(teacher, plan, run))
        metrics["params"] = count_parameters(teacher)
        metrics["model"] = config.teacher.model.name
        metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
        save_model(
            run.model_path,
            teacher,
            config.teacher.model.name,
            config.teacher.model.kwargs,
            temperature=metrics["calibration/temperature"],
            calibration_method=config.teacher.calibration.method,
        )
        log_summary(loggers, metrics)
        return metrics

    metrics = _execute(run, "teacher", work)
    load_model_weights(teacher, run.model_path)  # a reused run's weights; a fresh run's, unchanged
    return teacher, metrics


def calibrate(model: nn.Module, plan: Plan, run: Run) -> dict[str, Any]:
    """Fit the configured calibration on the held-out split; report test metrics before/after."""
    cfg = plan.config.teacher.calibration
    device = next(model.parameters()).device
    test_logits, test_targets = collect_logits(model, plan.datamodule.test_dataloader(), device)
    if cfg.method == "none":
        temperature = 1.0
    else:
        held_logits, held_targets = collect_logits(model, plan.datamodule.calibration_dataloader(), device)
        temperature = CALIBRATORS.get(cfg.method)(held_logits, held_targets)
    report = calibration_report(test_logits, test_targets, temperature, cfg.bins)
    atomic_write_json(run.dir / "calibration.json", {"method": cfg.method, "temperature": temperature, **report})
    reliability_diagram(
        [
            ("before calibration", test_logits.softmax(-1), report["before"]["ece"]),
            (f"after (T={temperature:.2f})", (test_logits / temperature).softmax(-1), report["after"]["ece"]),
        ],
        test_targets,
        run.dir / "reliability.png",
        cfg.bins,
        title=f"teacher {plan.config.teacher.model.name}, test split",
    )
    metrics: dict[str, Any] = {"calibration/temperature": temperature}
    for when, values in report.items():
        metrics.update({f"test/{k}" + ("" if when == "before" else "_calibrated"): v for k, v in values.items()})
    return metrics


def build_student_system(
    plan: Plan, teacher: nn.Module | None, teacher_temperature: float = 1.0, stage: str = "main"
) -> L.LightningModule:
    """The configured scheme around the planned student, method and (frozen) teacher."""
    frozen = FrozenTeacher(teacher, plan.method.teacher_taps, teacher_temperature) if teacher is not None else None
    return SCHEMES.get(plan.config.scheme)(
        student=plan.student,
        method=plan.method,
        weights=plan.weights,
        train=plan.config.student.train if stage == "main" else init_recipe(plan),
        num_classes=plan.datamodule.num_classes,
        teacher=frozen,
        stage=stage,
    )


def init_recipe(plan: Plan) -> TrainConfig:
    """The initialisation stage's recipe: the student's optimiser at a constant (init) rate."""
    train = plan.config.student.train
    optimizer = replace(train.optimizer, lr=plan.method.init_lr or train.optimizer.lr)
    return replace(train, epochs=plan.method.init_epochs, optimizer=optimizer, schedule=ScheduleConfig(name="constant"))


def run_init_stage(plan: Plan, teacher: nn.Module | None, temperature: float) -> None:
    """The method's initialisation epochs, as the sub-run ``<student run>/init`` (own checkpoints,
    logs and resume). Its result, student and method states, seeds the main stage."""
    config, parent = plan.config, plan.student_run
    run = Run(parent.dir / "init", {**parent.spec, "stage": "student-init"})
    state_path = run.dir / "state.pt"
    if not run.is_finished():
        run.prepare()
        run.set_status("running")
        system = build_student_system(plan, teacher, temperature, stage="init")
        recipe = init_recipe(plan)
        metrics, loggers = fit_and_test(
            system,
            plan.datamodule,
            run,
            recipe,
            config.runtime,
            config.seed,
            f"{config.name}/student-init",
            "student-init",
            test=False,
        )
        buffer = io.BytesIO()
        torch.save({"student": plan.student.state_dict(), "method": plan.method.state_dict()}, buffer)
        atomic_write_bytes(state_path, buffer.getvalue())
        log_summary(loggers, metrics)
        run.finish(metrics)
    state = check_checkpoint(state_path)
    plan.student.load_state_dict(state["student"])
    plan.method.load_state_dict(state["method"])


def ensure_student(plan: Plan, teacher: nn.Module | None, teacher_metrics: dict[str, Any] | None) -> dict[str, Any]:
    config, run = plan.config, plan.student_run

    def work() -> dict[str, Any]:
        temperature = 1.0
        if teacher_metrics is not None and config.teacher.use_calibrated_logits:
            temperature = teacher_metrics["calibration/temperature"]
        if plan.method.init_epochs > 0 and not run.last_checkpoint.exists():
            run_init_stage(plan, teacher, temperature)
        system = build_student_system(plan, teacher, temperature)
        metrics, loggers = fit_and_test(
            system,
            plan.datamodule,
            run,
            config.student.train,
            config.runtime,
            config.seed,
            f"{config.name}/student",
            "student",
        )
        metrics["params"] = count_parameters(plan.student)
        metrics["model"] = config.student.model.name
        metrics["method"] = config.method.name
        metrics["weights"] = plan.weights
        if plan.teacher_run is not None:
            metrics["teacher_run"] = str(plan.teacher_run.dir)
        save_model(run.model_path, plan.student, config.student.model.name, config.student.model.kwargs)
        log_summary(loggers, metrics)
        return metrics

    return _execute(run, "student", work)


@dataclass
class Outcome:
    """The finished runs of one experiment."""

    student_run: Run
    student: dict[str, Any]
    teacher_run: Run | None = None
    teacher: dict[str, Any] | None = None


def run_experiment(config: ExperimentConfig) -> Outcome:
    """Plan (validate), then execute."""
    return execute_plan(plan_experiment(config))


def execute_plan(plan: Plan) -> Outcome:
    """Teacher (reused if finished) -> calibration -> student (reused if finished)."""
    teacher, teacher_metrics = (None, None)
    if plan.teacher_run is not None:
        teacher, teacher_metrics = ensure_teacher(plan)
    student_metrics = ensure_student(plan, teacher, teacher_metrics)
    return Outcome(plan.student_run, student_metrics, plan.teacher_run, teacher_metrics)
