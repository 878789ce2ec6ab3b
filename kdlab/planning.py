"""Planning: validate and build every part of an experiment without training or writing anything.

Planning builds every part once and runs the whole scheme on a two-sample dry run, so a bad name,
option, layer, class count or scheme/method combination fails in seconds with one line, before any
run folder is touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.cache import SoftLabelStore
from kdlab.config import (
    ExperimentConfig,
    ModelConfig,
    ScheduleConfig,
    TeacherConfig,
    TrainConfig,
    resolved_teachers,
    spec_dict,
)
from kdlab.data import ClassificationDataModule, create_datamodule
from kdlab.data.base import Batch
from kdlab.distributed import check_runtime
from kdlab.errors import ConfigError, KdlabError, did_you_mean
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.files import file_sha256
from kdlab.loggers import wandb_mode
from kdlab.methods import METHODS, Method, create_method, resolve_weights
from kdlab.methods.registry import resolved_params
from kdlab.modelio import load_model_weights
from kdlab.models import create_model
from kdlab.optim import OPTIMIZERS, SCHEDULES
from kdlab.runs import TEACHER_GROUP, Run
from kdlab.sam import check_sam
from kdlab.schemes import SCHEMES, DistillationScheme, FrozenTeacher, SystemParts, parse_options
from kdlab.schemes.teacher import StoredTeacher, StoreLookup
from kdlab.teachers.calibration import CALIBRATORS
from kdlab.teachers.ensemble import ENSEMBLE_SEED_OFFSET, DeepEnsemble

TEACHER_SEED_OFFSET = 1_000_003
# Online peers (and other student-architecture models a scheme adds) draw from their own streams.
PEER_SEED_OFFSET = 2_000_003


@dataclass
class TeacherPlan:
    """One teacher: its config, its (untrained or loaded) model, its run and its seed; or, with
    ``source=cache``, its soft-label store (``model`` then looks logits up by sample index)."""

    config: TeacherConfig
    model: nn.Module
    run: Run
    seed: int
    store: SoftLabelStore | None = None
    # A deep ensemble (``ensemble`` > 1): its members, each a teacher of its own; ``model`` is then
    # a :class:`DeepEnsemble` for checking shapes and ``run`` the first member's.
    members: list[TeacherPlan] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        """The run folders this teacher needs: its own, or its members'."""
        return [member.run for member in self.members] if self.members else [self.run]

    @property
    def key(self) -> str:
        """What identifies the teacher in a dependent run's spec."""
        return "+".join(run.hash for run in self.runs)


@dataclass
class ChainLink:
    """One intermediate model of an assistant chain: trained as a student, then a teacher."""

    model_config: ModelConfig
    model: nn.Module
    run: Run


@dataclass
class Plan:
    """Everything a run needs, validated."""

    config: ExperimentConfig
    datamodule: ClassificationDataModule
    student: nn.Module
    method: Method
    weights: dict[str, float]
    student_run: Run
    teachers: list[TeacherPlan] = field(default_factory=list)
    scheme: type[DistillationScheme] = field(default=None)  # type: ignore[assignment]
    options: Any = None
    chain: list[ChainLink] = field(default_factory=list)

    @property
    def teacher(self) -> nn.Module | None:
        """The first teacher's model (None without teachers)."""
        return self.teachers[0].model if self.teachers else None

    @property
    def teacher_run(self) -> Run | None:
        return self.teachers[0].run if self.teachers else None

    def stage_run(self, stage: str) -> Run | None:
        """The run a table cell of this stage reports: ``teacher`` or ``student``."""
        return self.teacher_run if stage == "teacher" else self.student_run

    @property
    def teacher_input_key(self) -> str:
        """Paired (cross-modal) data gives teachers their own modality."""
        return self.datamodule.teacher_input_key


def is_paired(datamodule: ClassificationDataModule) -> bool:
    return getattr(datamodule, "teacher_input_shape", None) is not None


def plan_experiment(config: ExperimentConfig) -> Plan:
    """Check every part of ``config`` and build it, without training or writing anything."""
    scheme = SCHEMES.get(config.scheme)
    options = parse_options(config.scheme, config.scheme_params)
    wandb_mode(config.runtime.wandb)
    check_runtime(config.runtime, config.data.batch_size)
    callbacks = _check_callbacks(config)
    method_cls = METHODS.get(config.method.name)
    weights = resolve_weights(method_cls, config.method.weights)
    method = create_method(config.method)
    datamodule = create_datamodule(config.data, config.seed)
    _check_recipe("student", config.student.train)
    student = build_model("student", config.student.model, datamodule, config.seed)

    teacher_configs = _teacher_configs(config, scheme, method_cls.needs_teacher)
    _check_teacher_options(config, teacher_configs, scheme, method)
    teachers = [
        _plan_teacher(config, teacher_config, index, datamodule) for index, teacher_config in enumerate(teacher_configs)
    ]
    plan = Plan(config, datamodule, student, method, weights, None, teachers, scheme, options)  # type: ignore[arg-type]
    _dry_run(plan, callbacks)
    chain_spec = scheme.plan_chain(plan) if hasattr(scheme, "plan_chain") else None
    spec = student_spec(config, plan, resolved_params(method_cls, config.method.params), weights, chain_spec)
    plan.student_run = Run.for_spec(config.runtime.runs_dir, config.name, spec)
    for run in [r for t in plan.teachers for r in t.runs] + [link.run for link in plan.chain] + [plan.student_run]:
        if not run.is_finished():
            run.resumable_checkpoint()
    return plan


def _teacher_configs(config: ExperimentConfig, scheme: type[DistillationScheme], needs: bool) -> list[TeacherConfig]:
    """The teachers the scheme takes, with a clear error when the config gives another count."""
    given = resolved_teachers(config)
    taken = scheme.teachers_taken
    if taken == "none":
        if config.teachers:
            raise ConfigError(f"scheme '{config.scheme}' trains without teachers; remove 'teachers'")
        return []
    if taken == "many":
        if not config.teachers:
            raise ConfigError(
                f"scheme '{config.scheme}' needs a 'teachers' list (e.g. teachers=[{{}},{{}},{{}}] for three"
                " of 'teacher' with seeds seed, seed+1, seed+2); it is empty"
            )
        return given
    if len(given) > 1:
        raise ConfigError(
            f"scheme '{config.scheme}' takes one teacher but 'teachers' lists {len(given)}; use scheme=multi_teacher"
        )
    return given if (needs or taken == "one") else []


TEACHER_SOURCES = ("model", "cache")


def _check_teacher_options(
    config: ExperimentConfig, teachers: list[TeacherConfig], scheme: type[DistillationScheme], method: Method
) -> None:
    """Ensembles and ``teacher.source=cache`` only where their logits can stand in for a teacher."""
    for teacher in teachers:
        if teacher.source not in TEACHER_SOURCES:
            hint = did_you_mean(teacher.source, TEACHER_SOURCES)
            raise ConfigError(
                f"unknown teacher.source '{teacher.source}'{'; ' + hint if hint else ''}"
                f" (valid: {', '.join(TEACHER_SOURCES)})"
            )
        if teacher.ensemble < 1:
            raise ConfigError(f"teacher.ensemble must be at least 1 (members), got {teacher.ensemble}")
        if teacher.ensemble > 1 and method.teacher_taps:
            raise ConfigError(
                f"method '{method.name}' reads the teacher's features ({', '.join(method.teacher_taps)}), and a deep"
                " ensemble has only averaged probabilities; use teacher.ensemble=1, or list the members as"
                " teachers of scheme=multi_teacher with combine=per_teacher"
            )
        if teacher.ensemble > 1 and teacher.source == "cache":
            raise ConfigError("teacher.ensemble > 1 with teacher.source=cache: stores hold single teacher runs")
        if teacher.ensemble > 1 and teacher.use_calibrated_logits:
            raise ConfigError(
                "teacher.use_calibrated_logits with an ensemble: its members have temperatures of their own;"
                " averaging probabilities is already the ensemble's calibration"
            )
    if not any(teacher.source == "cache" for teacher in teachers):
        return
    if not scheme.reads_teacher_store:
        valid = ", ".join(name for name in SCHEMES.names() if SCHEMES.get(name).reads_teacher_store)
        raise ConfigError(
            f"scheme '{config.scheme}' calls its teachers on inputs, so teacher.source=cache cannot stand in;"
            f" schemes that read a soft-label store: {valid}"
        )
    if method.teacher_taps:
        raise ConfigError(
            f"method '{method.name}' reads the teacher's features ({', '.join(method.teacher_taps)}), and a"
            " soft-label store holds only its logits; use teacher.source=model"
        )


def _plan_teacher(
    config: ExperimentConfig, teacher: TeacherConfig, index: int, datamodule: ClassificationDataModule
) -> TeacherPlan:
    role = "teacher" if index == 0 else f"teacher {index}"
    if teacher.checkpoint is None:
        _check_recipe(role, teacher.train)
    if teacher.calibration.method != "none":
        CALIBRATORS.get(teacher.calibration.method)
    if teacher.use_calibrated_logits and teacher.calibration.method != "temperature":
        raise ConfigError(
            f"{role}: use_calibrated_logits divides the logits by the calibration temperature, so it needs"
            f" calibration.method=temperature, not '{teacher.calibration.method}'"
        )
    seed = teacher.seed if teacher.seed is not None else config.seed + index
    if teacher.ensemble > 1:
        members = [
            _plan_teacher(config, replace(teacher, ensemble=1, seed=seed + m * ENSEMBLE_SEED_OFFSET), index, datamodule)
            for m in range(teacher.ensemble)
        ]
        # Copies: the dry run only needs shapes, and the members must stay trainable.
        shapes = DeepEnsemble([copy.deepcopy(member.model) for member in members])
        return TeacherPlan(teacher, shapes, members[0].run, seed, members=members)
    if teacher.source == "cache":
        from kdlab.teachers.stored import open_student_store

        run = Run.for_spec(config.runtime.runs_dir, TEACHER_GROUP, teacher_spec(config, teacher, seed))
        augment = config.student.train.augment
        datamodule.use_augmentation(augment)  # the store is read by the student's training
        data = config.data if augment is None else replace(config.data, augment=augment)
        store = open_student_store(teacher.store, config.runtime.runs_dir, run.dir, data, datamodule, role)
        return TeacherPlan(teacher, StoreLookup(store), run, seed, store)
    model = build_model(role, teacher.model, datamodule, seed + TEACHER_SEED_OFFSET, teacher=True)
    if teacher.checkpoint is not None:
        load_model_weights(model, Path(teacher.checkpoint))  # a missing file: its own clear error
    run = Run.for_spec(config.runtime.runs_dir, TEACHER_GROUP, teacher_spec(config, teacher, seed))
    return TeacherPlan(teacher, model, run, seed)


def _check_callbacks(config: ExperimentConfig) -> list[Any]:
    from kdlab.callbacks.registry import create_callback

    return [create_callback(callback.name, callback.params) for callback in config.callbacks]


def teacher_spec(
    config: ExperimentConfig, teacher: TeacherConfig | None = None, seed: int | None = None
) -> dict[str, Any]:
    """What determines a teacher: shared by every student whose experiment resolves to it."""
    teacher = teacher or config.teacher
    model_data = spec_dict(teacher.model)
    spec: dict[str, Any] = {
        "stage": "teacher",
        "seed": config.seed if seed is None else seed,
        "data": teacher_data_spec(config, teacher.train.augment),
        "model": model_data,
        "calibration": spec_dict(teacher.calibration),
    }
    if teacher.checkpoint is None:
        spec["train"] = recipe_spec(teacher.train)
    else:
        path = Path(teacher.checkpoint).resolve()
        spec["checkpoint"] = {"path": str(path), "sha256": file_sha256(path)}
    return spec


def student_spec(
    config: ExperimentConfig,
    plan: Plan,
    params: dict[str, Any],
    weights: dict[str, float],
    chain: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole experiment minus what never changes the numbers (runtime, description), with the
    method's parameters and weights resolved, so a changed code default is a new run, not a reuse."""
    spec: dict[str, Any] = {
        "stage": "student",
        "seed": config.seed,
        "scheme": config.scheme,
        "data": data_spec(config, config.student.train.augment),
        "student": {**spec_dict(config.student), "train": recipe_spec(config.student.train)},
        "method": {"name": config.method.name, "params": params, "weights": weights},
    }
    options = asdict(plan.options) if plan.options is not None else {}
    if options:
        spec["scheme_params"] = options
    runs = [_teacher_entry(t) for t in plan.teachers]
    if len(runs) == 1:
        spec["teacher"] = runs[0]
    elif runs:
        spec["teachers"] = runs
    if chain:
        spec["chain"] = chain
    if config.callbacks:
        spec["callbacks"] = [spec_dict(c) for c in config.callbacks]
    return spec


def _teacher_entry(teacher: TeacherPlan) -> dict[str, Any]:
    """A teacher as a student's spec names it: its run, and its store when read from one."""
    if teacher.members:
        return {"ensemble": [run.hash for run in teacher.runs]}
    entry: dict[str, Any] = {"run": teacher.run.hash, "use_calibrated_logits": teacher.config.use_calibrated_logits}
    if teacher.store is not None:
        entry.update(source="cache", store=teacher.store.content_hash)
    return entry


def teacher_data_spec(config: ExperimentConfig, augment: bool | None = None) -> dict[str, Any]:
    """The data config minus the options that only change what the student sees."""
    from kdlab.data import DATASETS

    spec = data_spec(config, augment)
    student_only = DATASETS.get(config.data.name).student_only_options
    spec["kwargs"] = {k: v for k, v in spec["kwargs"].items() if k not in student_only}
    return spec


def data_spec(config: ExperimentConfig, augment: bool | None = None) -> dict[str, Any]:
    """The data config minus where the files live, which never changes a result; ``augment`` is a
    recipe's own augmentation setting, which replaces ``data.augment`` when given."""
    spec = {key: value for key, value in spec_dict(config.data).items() if key != "root"}
    return spec if augment is None else {**spec, "augment": augment}


def recipe_spec(train: TrainConfig) -> dict[str, Any]:
    """A training recipe as a spec names it: its augmentation setting lives in the data spec."""
    return {key: value for key, value in spec_dict(train).items() if key != "augment"}


def _check_recipe(role: str, train: TrainConfig) -> None:
    """A recipe's names and settings; the student's are checked again by its scheme, which also
    knows whether it runs its own training step."""
    OPTIMIZERS.get(train.optimizer.name)
    SCHEDULES.get(train.schedule.name)
    try:
        check_sam(train)
    except ConfigError as error:
        raise ConfigError(f"{role}: {error}") from None
    if train.epochs < 1:
        raise ConfigError(f"{role}.train.epochs must be at least 1, got {train.epochs}")


def build_model(
    role: str, model: ModelConfig, datamodule: ClassificationDataModule, seed: int, teacher: bool = False
) -> nn.Module:
    """Build a model for the dataset's class count from ``seed``: same seed, same initial weights.
    (Callers give teachers a seed stream of their own, so a student never starts as its teacher.)"""
    kwargs = dict(model.kwargs)
    kwargs.setdefault("num_classes", datamodule.num_classes)
    torch.manual_seed(seed)
    try:
        return create_model(model.name, **kwargs)
    except KdlabError as error:
        raise type(error)(f"{role}: {error}") from None


def example_batch(datamodule: ClassificationDataModule, size: int = 2) -> Batch:
    """A fake batch with the data's shapes and keys (paired data: both modalities)."""
    batch: dict[str, torch.Tensor] = {
        "input": torch.zeros(size, *datamodule.input_shape),
        "target": torch.arange(size) % datamodule.num_classes,
        "index": torch.arange(size),
    }
    if is_paired(datamodule):
        batch[datamodule.teacher_input_key] = torch.zeros(size, *datamodule.teacher_input_shape)  # type: ignore[attr-defined]
        batch["labelled"] = torch.ones(size, dtype=torch.bool)
    return batch  # type: ignore[return-value]


def check_model(
    role: str, model: nn.Module, taps: tuple[str, ...], inputs: torch.Tensor, num_classes: int, source: str
) -> ModelOutput:
    """One eval-mode forward: the model takes the data's inputs and predicts its classes."""
    hooks = FeatureTaps(model, taps, role=role)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = tapped_forward(model, hooks, inputs)
    except RuntimeError as error:
        raise ConfigError(
            f"{role} model {type(model).__name__} cannot take {source} inputs of shape {list(inputs.shape[1:])}:"
            f" {str(error).splitlines()[0]}"
        ) from None
    finally:
        hooks.remove()
        model.train(was_training)
    classes = output.logits.shape[-1]
    if classes != num_classes:
        raise ConfigError(f"num_classes mismatch: {role} outputs {classes} classes but the dataset has {num_classes}")
    return output


def _outputs(plan: Plan, teachers: list[nn.Module]) -> tuple[Batch, ModelOutput, list[ModelOutput]]:
    """Fake samples through the student and ``teachers`` with the method's taps: shapes, class
    counts and layer names agree."""
    datamodule, method = plan.datamodule, plan.method
    batch = example_batch(datamodule)
    source, classes = type(datamodule).__name__, datamodule.num_classes
    student = check_model("student", plan.student, method.student_taps, batch["input"], classes, source)
    teacher_inputs = batch[plan.teacher_input_key]  # type: ignore[literal-required]
    outputs = [
        ModelOutput(model(batch["index"]))
        if isinstance(model, StoreLookup)
        else check_model(
            "teacher" if i == 0 else f"teacher {i}", model, method.teacher_taps, teacher_inputs, classes, source
        )
        for i, model in enumerate(teachers)
    ]
    return batch, student, outputs


def _dry_run(plan: Plan, callbacks: list[Any]) -> None:
    """Fake samples through every part: the models take the data, the method can use their
    features, and the whole scheme computes its loss once."""
    method = plan.method
    batch, student, teachers = _outputs(plan, [t.model for t in plan.teachers])
    if plan.scheme.teachers_taken == "none" and method.needs_teacher:
        teachers = [student]  # online and self schemes: the method compares student-side outputs
    first = teachers[0] if teachers else None
    method.setup(student, first, plan.datamodule.data_info())
    with preserved(method):
        _try(lambda: method(student, first, batch), method.name)
        if method.init_epochs:
            _try(lambda: method.init_loss(student, first, batch), method.name)
    rng = torch.random.get_rng_state()
    with preserved(method), preserved(plan.student):
        # Copies: freezing is for trained teachers, and these may still have to train. In train
        # mode, as training will run it (quantisation observers need a training batch first);
        # what that changes in the student and method is put back, the rest is thrown away.
        system = build_system(plan, [t.model if t.store else copy.deepcopy(t.model) for t in plan.teachers])
        system.train()
        with torch.no_grad():
            _try(lambda: system.loss_terms(batch), method.name, f"scheme '{plan.config.scheme}'")
        for callback in callbacks:  # e.g. a temperature schedule on a method without temperature
            if hasattr(callback, "validate"):
                callback.validate(system)
    torch.random.set_rng_state(rng)  # the probe's seeding must not shift what training draws


def setup_method(plan: Plan, teachers: list[nn.Module]) -> None:
    """Set up ``plan.method`` for ``plan.student`` against the first of ``teachers`` (a chain
    stage's fresh method: its parts' shapes depend on the two models)."""
    _, student, outputs = _outputs(plan, teachers[:1])
    plan.method.setup(student, outputs[0], plan.datamodule.data_info())


class preserved:
    """Put a module's state and mode back after the dry run touched it (memory banks, BN stats)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.state = copy.deepcopy(self.module.state_dict())
        self.training = self.module.training
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.load_state_dict(self.state)
        self.module.train(self.training)


def _try(compute: Callable[[], Any], method: str, where: str = "") -> None:
    """Run ``compute``; a shape or index error becomes a one-line ConfigError naming the method."""
    try:
        compute()
    except (ValueError, RuntimeError, IndexError) as error:
        context = f" under {where}" if where else ""
        raise ConfigError(
            f"method '{method}'{context} cannot use these models' features: {str(error).splitlines()[0]}"
        ) from None


def build_system(
    plan: Plan,
    teachers: list[nn.Module],
    temperatures: list[float] | None = None,
    stage: str = "main",
) -> DistillationScheme:
    """The configured scheme around the planned student, method and frozen teachers. The
    scheme's own parts are initialised from the experiment's seed, so a rebuilt system (the dry
    run's, a resumed run's) starts the same."""
    config = plan.config
    temperatures = temperatures or [1.0] * len(teachers)
    frozen = [
        StoredTeacher(m, t) if isinstance(m, StoreLookup) else FrozenTeacher(m, plan.method.teacher_taps, t)
        for m, t in zip(teachers, temperatures, strict=True)
    ]

    def make_student(k: int) -> nn.Module:
        return build_model(f"peer {k}", config.student.model, plan.datamodule, config.seed + k * PEER_SEED_OFFSET)

    parts = SystemParts(
        student=plan.student,
        method=plan.method,
        weights=plan.weights,
        train=config.student.train if stage == "main" else init_recipe(plan),
        num_classes=plan.datamodule.num_classes,
        teachers=frozen,
        options=plan.options,
        stage=stage,
        teacher_input_key=plan.teacher_input_key,
        make_method=lambda: create_method(config.method),
        make_student=make_student,
        example=example_batch(plan.datamodule),
        data_info=plan.datamodule.data_info(),
        labelled_fraction=float(getattr(plan.datamodule, "student_labels", 1.0)),
    )
    torch.manual_seed(config.seed)
    return plan.scheme(parts)


def init_recipe(plan: Plan) -> TrainConfig:
    """The initialisation stage's recipe: the student's optimiser at a constant (init) rate."""
    train = plan.config.student.train
    optimizer = replace(train.optimizer, lr=plan.method.init_lr or train.optimizer.lr)
    return replace(train, epochs=plan.method.init_epochs, optimizer=optimizer, schedule=ScheduleConfig(name="constant"))
