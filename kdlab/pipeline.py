"""``kdlab run``: plan (validate everything, train nothing), then teachers -> calibration -> student.

Planning lives in :mod:`kdlab.planning`; this module executes a plan: each model is a run that is
reused when finished, resumed when interrupted, and trained otherwise.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdlab.config import ModelConfig, RuntimeConfig, TeacherConfig, TrainConfig
from kdlab.distributed import is_global_zero, rank_zero_decides, wait_for_rank_zero
from kdlab.files import atomic_write_bytes, atomic_write_json
from kdlab.loggers import log_summary
from kdlab.methods import METHODS
from kdlab.metrics import evaluate_logits
from kdlab.modelio import MODEL_FILE_FORMAT, load_model_weights, save_model
from kdlab.models import count_parameters
from kdlab.planning import (
    TEACHER_SEED_OFFSET,
    ChainLink,
    Plan,
    TeacherPlan,
    build_system,
    data_spec,
    init_recipe,
    plan_experiment,
    student_spec,
    teacher_spec,
)
from kdlab.plots import reliability_diagram
from kdlab.quantization import model_size_bytes
from kdlab.runs import Run, check_checkpoint
from kdlab.schemes import DistillationScheme, SystemParts
from kdlab.schemes.offline import OfflineDistillation
from kdlab.teachers.calibration import Calibrator, calibration_report, collect_logits, fit_calibrator
from kdlab.teachers.ensemble import DeepEnsemble
from kdlab.training import fit_and_test

__all__ = [
    "MODEL_FILE_FORMAT",
    "TEACHER_SEED_OFFSET",
    "ChainLink",
    "Outcome",
    "Plan",
    "build_student_system",
    "data_spec",
    "ensure_student",
    "ensure_teacher",
    "execute_plan",
    "load_model_weights",
    "plan_experiment",
    "run_experiment",
    "save_model",
    "student_spec",
    "supervised_system",
    "teacher_spec",
]


def execute_run(run: Run, label: str, work: Any, runtime: RuntimeConfig) -> dict[str, Any]:
    """Reuse a finished run, else run ``work`` under the run's lock with status bookkeeping.
    On several processes rank 0 alone locks and writes; the others train with it, then read."""
    if not is_global_zero(runtime):
        if not rank_zero_decides(run.is_finished()):
            work()  # this rank's part of the collective training; its result is rank 0's to write
            wait_for_rank_zero(run)
        return run.metrics()
    with run.lock():
        if rank_zero_decides(run.is_finished()):
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
        wait_for_rank_zero(run)
        return metrics


def supervised_system(
    plan: Plan, model: nn.Module, train: TrainConfig, input_key: str, bins: int
) -> DistillationScheme:
    """Plain supervised training of ``model`` (how teachers are trained)."""
    parts = SystemParts(
        student=model,
        method=METHODS.get("ce")(),
        weights={"ce": 1.0},
        train=train,
        num_classes=plan.datamodule.num_classes,
        calibration_bins=bins,
        input_key=input_key,
        honour_labelled=False,
    )
    return OfflineDistillation(parts)


def ensure_teacher(plan: Plan, index: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load) and calibrate teacher ``index`` unless a finished run with its config
    exists; a deep ensemble's members each so; a stored teacher is only looked up."""
    teacher: TeacherPlan = plan.teachers[index]
    label = "teacher" if len(plan.teachers) == 1 else f"teacher {index}"
    if teacher.store is not None:  # source=cache: the store stands in; the teacher is never built
        print(f"[kdlab] {label}: reading soft-label store {teacher.store.path}")
        return teacher.model, dict(teacher.store.manifest["teacher"]["metrics"])
    if teacher.members:
        trained = [_ensure_model(plan, member, f"{label} member {m}") for m, member in enumerate(teacher.members)]
        ensemble = DeepEnsemble([model for model, _ in trained])
        return ensemble, ensemble_metrics(plan, ensemble, [metrics for _, metrics in trained])
    return _ensure_model(plan, teacher, label)


def ensemble_metrics(plan: Plan, ensemble: DeepEnsemble, members: list[dict[str, Any]]) -> dict[str, Any]:
    """The ensemble's test accuracy and calibration (it has no run of its own), and its members'."""
    device = next(ensemble.parameters()).device
    logits, targets = collect_logits(ensemble, plan.datamodule.test_dataloader(), device, plan.teacher_input_key)
    metrics: dict[str, Any] = {f"test/{k}": v for k, v in evaluate_logits(logits, targets).items()}
    metrics["ensemble"] = len(members)
    metrics["members/test/top1"] = [m.get("test/top1") for m in members]
    metrics["params"] = sum(m.get("params", 0) for m in members)
    return metrics


def _ensure_model(plan: Plan, teacher: TeacherPlan, label: str) -> tuple[nn.Module, dict[str, Any]]:
    config = plan.config
    run, model, recipe = teacher.run, teacher.model, teacher.config

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        metrics: dict[str, Any] = {}
        loggers: list[Any] = []
        if recipe.checkpoint is None:
            system = supervised_system(plan, model, recipe.train, plan.teacher_input_key, recipe.calibration.bins)
            metrics, loggers = fit_and_test(
                system,
                plan.datamodule,
                run,
                recipe.train,
                config.runtime,
                teacher.seed,
                f"{config.name}/{label}",
                "teacher",
            )
        if not is_global_zero(config.runtime):
            return metrics
        metrics.update(calibrate(model, plan, run, recipe))
        metrics["params"] = count_parameters(model)
        metrics["model"] = recipe.model.name
        metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
        save_model(
            run.model_path,
            model,
            recipe.model.name,
            recipe.model.kwargs,
            temperature=metrics.get("calibration/temperature"),
            calibration_method=recipe.calibration.method,
        )
        log_summary(loggers, metrics)
        return metrics

    metrics = execute_run(run, label, work, config.runtime)
    load_model_weights(model, run.model_path)  # a reused run's weights; a fresh run's, unchanged
    return model, metrics


def calibrate(model: nn.Module, plan: Plan, run: Run, recipe: TeacherConfig) -> dict[str, Any]:
    """Fit the configured calibration on the held-out split; report test metrics before/after."""
    cfg = recipe.calibration
    device = next(model.parameters()).device
    key = plan.teacher_input_key
    test_logits, test_targets = collect_logits(model, plan.datamodule.test_dataloader(), device, key)
    calibrator: Calibrator | float = 1.0
    if cfg.method != "none":
        held_logits, held_targets = collect_logits(model, plan.datamodule.calibration_dataloader(), device, key)
        calibrator = fit_calibrator(cfg.method, held_logits, held_targets)
    report = calibration_report(test_logits, test_targets, calibrator, cfg.bins)
    fitted = calibrator.summary() if isinstance(calibrator, Calibrator) else {"temperature": 1.0}
    atomic_write_json(run.dir / "calibration.json", {"method": cfg.method, **fitted, **report})
    with torch.no_grad():
        calibrated = calibrator(test_logits.double()) if isinstance(calibrator, Calibrator) else test_logits
    label = f"T={fitted['temperature']:.2f}" if "temperature" in fitted else cfg.method
    reliability_diagram(
        [
            ("before calibration", test_logits.softmax(-1), report["before"]["ece"]),
            (f"after ({label})", calibrated.float().softmax(-1), report["after"]["ece"]),
        ],
        test_targets,
        run.dir / "reliability.png",
        cfg.bins,
        title=f"teacher {recipe.model.name}, test split",
    )
    metrics: dict[str, Any] = {}
    if "temperature" in fitted:  # what use_calibrated_logits divides the teacher's logits by
        metrics["calibration/temperature"] = fitted["temperature"]
    for when, values in report.items():
        metrics.update({f"test/{k}" + ("" if when == "before" else "_calibrated"): v for k, v in values.items()})
    return metrics


def build_student_system(
    plan: Plan,
    teacher: nn.Module | list[nn.Module] | None,
    teacher_temperature: float | list[float] = 1.0,
    stage: str = "main",
) -> DistillationScheme:
    """The configured scheme around the planned student, method and (frozen) teacher(s)."""
    teachers = [] if teacher is None else (list(teacher) if isinstance(teacher, list) else [teacher])
    temperatures = (
        teacher_temperature if isinstance(teacher_temperature, list) else [teacher_temperature] * len(teachers)
    )
    return build_system(plan, teachers, temperatures, stage)


def run_init_stage(plan: Plan, teachers: list[nn.Module], temperatures: list[float]) -> None:
    """The method's initialisation epochs, as the sub-run ``<student run>/init`` (own checkpoints,
    logs and resume). Its result, student and method states, seeds the main stage."""
    config, parent = plan.config, plan.student_run
    run = Run(parent.dir / "init", {**parent.spec, "stage": "student-init"})
    state_path = run.dir / "state.pt"
    writer = is_global_zero(config.runtime)
    if not rank_zero_decides(run.is_finished()):
        if writer:
            run.prepare()
            run.set_status("running")
        system = build_student_system(plan, teachers, temperatures, stage="init")
        metrics, loggers = fit_and_test(
            system,
            plan.datamodule,
            run,
            init_recipe(plan),
            config.runtime,
            config.seed,
            f"{config.name}/student-init",
            "student-init",
            test=False,
        )
        if writer:
            buffer = io.BytesIO()
            torch.save({"student": plan.student.state_dict(), "method": plan.method.state_dict()}, buffer)
            atomic_write_bytes(state_path, buffer.getvalue())
            log_summary(loggers, metrics)
            run.finish(metrics)
        wait_for_rank_zero(run)
    state = check_checkpoint(state_path)
    plan.student.load_state_dict(state["student"])
    plan.method.load_state_dict(state["method"])


def teacher_temperatures(plan: Plan, teacher_metrics: list[dict[str, Any]]) -> list[float]:
    """Each teacher's logit divisor: its calibration temperature where the config asks for it."""
    return [
        metrics.get("calibration/temperature", 1.0) if t.config.use_calibrated_logits else 1.0
        for t, metrics in zip(plan.teachers, teacher_metrics, strict=True)
    ]


def ensure_student(
    plan: Plan,
    teachers: list[nn.Module],
    temperatures: list[float],
    label: str = "student",
    model_config: ModelConfig | None = None,
) -> dict[str, Any]:
    """Train the student (after the method's initialisation stage, if any) unless it is finished."""
    from kdlab.callbacks.registry import create_callback

    config, run = plan.config, plan.student_run
    model_config = model_config or config.student.model

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        if plan.method.init_epochs > 0 and not run.last_checkpoint.exists():
            run_init_stage(plan, teachers, temperatures)
        system = build_student_system(plan, teachers, temperatures)
        callbacks = [create_callback(c.name, c.params) for c in config.callbacks]
        metrics, loggers = fit_and_test(
            system,
            plan.datamodule,
            run,
            config.student.train,
            config.runtime,
            config.seed,
            f"{config.name}/{label}",
            label,
            callbacks=callbacks,
        )
        if not is_global_zero(config.runtime):
            return metrics
        metrics.update(system.final_metrics(plan.datamodule))
        exported = system.export_model()
        # Of the architecture: an int8 model keeps its weights in packed buffers, not parameters.
        metrics["params"] = count_parameters(plan.student)
        metrics["size_bytes"] = model_size_bytes(exported)
        metrics["model"] = model_config.name
        metrics["method"] = config.method.name
        metrics["scheme"] = config.scheme
        metrics["weights"] = plan.weights
        metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
        if plan.teacher_run is not None:
            metrics["teacher_run"] = str(plan.teacher_run.dir)
        save_model(run.model_path, exported, model_config.name, model_config.kwargs, **system.export_extra())
        log_summary(loggers, metrics)
        return metrics

    return execute_run(run, label, work, config.runtime)


@dataclass
class Outcome:
    """The finished runs of one experiment."""

    student_run: Run
    student: dict[str, Any]
    teacher_run: Run | None = None
    teacher: dict[str, Any] | None = None
    teachers: list[dict[str, Any]] = field(default_factory=list)
    chain: list[dict[str, Any]] = field(default_factory=list)


def run_experiment(config: Any) -> Outcome:
    """Plan (validate), then execute."""
    return execute_plan(plan_experiment(config))


def execute_plan(plan: Plan) -> Outcome:
    """Teachers (reused if finished) -> calibration -> assistants, if any -> student."""
    teachers, teacher_metrics = [], []
    for index in range(len(plan.teachers)):
        model, metrics = ensure_teacher(plan, index)
        teachers.append(model)
        teacher_metrics.append(metrics)
    temperatures = teacher_temperatures(plan, teacher_metrics)
    chain_metrics = []
    if plan.chain:
        teachers, temperatures, chain_metrics = plan.scheme.execute_chain(plan, teachers, temperatures)  # type: ignore[attr-defined]
    student_metrics = ensure_student(plan, teachers, temperatures)
    return Outcome(
        plan.student_run,
        student_metrics,
        plan.teacher_run,
        teacher_metrics[0] if teacher_metrics else None,
        teacher_metrics,
        chain_metrics,
    )
