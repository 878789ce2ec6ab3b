"""One table or sweep cell, whatever its kind: plan its config, then run the stage it reports.

Image-classification experiments and causal-LM (``kind: lm``) experiments have their own
planners and pipelines; tables and the Slurm launcher go through here so they need not care.
"""

from __future__ import annotations

from typing import Any

from kdlab.catalog import is_lm_experiment, load_experiment, load_lm_experiment
from kdlab.pipeline import Plan, ensure_teacher, execute_plan, plan_experiment


def load_cell_config(experiment: str, overrides: list[str]) -> Any:
    """The typed config of an experiment of either kind."""
    return (
        load_lm_experiment(experiment, overrides)
        if is_lm_experiment(experiment)
        else load_experiment(experiment, overrides)
    )


def plan_cell(config: Any) -> Any:
    """Validate and build a config of either kind (a :class:`Plan` or an LM plan)."""
    from kdlab.lm.config import LMExperimentConfig

    if isinstance(config, LMExperimentConfig):
        from kdlab.lm.pipeline import plan_lm

        return plan_lm(config)
    return plan_experiment(config)


def run_stage(plan: Any, stage: str) -> dict[str, Any]:
    """Run (or reuse) what a cell reports: the teacher's metrics or the student's."""
    if isinstance(plan, Plan):
        return ensure_teacher(plan)[1] if stage == "teacher" else execute_plan(plan).student
    from kdlab.lm.pipeline import run_lm_stage

    return run_lm_stage(plan, stage)


def cell_method(plan: Any, stage: str) -> str:
    """What ``--only`` selects a cell by: ``teacher``, or the method (for LM cells, the loss)."""
    if stage == "teacher":
        return "teacher"
    return plan.config.method.name if isinstance(plan, Plan) else plan.method_name
