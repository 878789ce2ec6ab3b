"""Run by tests/test_lm_pipeline.py on 2 processes: LM distillation (a gpt-tiny teacher trained
first, then the student) under a strategy, recording what each rank holds of the teacher and the
student after the student's first training step.

Usage: python tests/lm_shard_probe.py OUT_DIR STRATEGY [overrides...]; writes OUT_DIR/rank-<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from shard_probe import full_numel, optimizer_numel

from kdlab.catalog import load_lm_experiment
from kdlab.distributed import local_numel
from kdlab.lm.pipeline import build_lm_system, ensure_lm_teacher, plan_lm
from kdlab.training import fit_and_test


class LMShardReport(L.Callback):
    """Each rank's parameter elements of the teacher and of the student, after one step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, *args: Any) -> None:
        if trainer.global_step != 1:
            return
        teacher = module.teacher
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        report = {
            "world": trainer.world_size,
            "teacher": local_numel(teacher),
            "teacher_full": full_numel(teacher),
            "student": local_numel(module.student),
            "student_full": full_numel(module.student),
            "optimizer": optimizer_numel(trainer),
            "teacher_in_optimizer": any(
                p is q
                for group in trainer.optimizers[0].param_groups
                for p in group["params"]
                for q in teacher.parameters()
            ),
            "loss": float(loss.detach()),
        }
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))


def main() -> None:
    out, strategy, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    config = load_lm_experiment(
        "lm-stdlib-kd", [f"runtime.runs_dir={out / 'runs'}", f"runtime.strategy={strategy}", *overrides]
    )
    plan = plan_lm(config)
    ensure_lm_teacher(plan)
    system = build_lm_system(plan, config.distill, config.student.train, plan.student, plan.teacher, None)
    run = plan.student_run
    run.prepare()
    fit_and_test(
        system,
        plan.datamodule,
        run,
        config.student.train,
        config.runtime,
        config.seed,
        "probe",
        "student",
        callbacks=[LMShardReport(out)],
    )


if __name__ == "__main__":
    main()
