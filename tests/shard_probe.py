"""Run by tests/test_distributed.py on 2 processes: multi-teacher distillation under a strategy,
recording what each rank holds of the teachers and the student after its first training step.

Usage: python tests/shard_probe.py OUT_DIR STRATEGY [overrides...]; writes OUT_DIR/rank-<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L

from kdlab.catalog import load_experiment
from kdlab.distributed import local_numel
from kdlab.pipeline import build_student_system, ensure_teacher, plan_experiment
from kdlab.training import fit_and_test


class ShardReport(L.Callback):
    """Each rank's parameter elements of every teacher and of the student, after one step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if trainer.global_step != 1:
            return
        report = {
            "world": trainer.world_size,
            "teachers": [local_numel(t.model) for t in module.teachers],
            "teachers_full": [full_numel(t.model) for t in module.teachers],
            "student": local_numel(module.student),
            "student_full": full_numel(module.student),
            "optimizer": optimizer_numel(trainer),
            "teacher_in_optimizer": any(
                p is q
                for group in trainer.optimizers[0].param_groups
                for p in group["params"]
                for t in module.teachers
                for q in t.parameters()
            ),
        }
        (self.out / f"rank-{trainer.global_rank}.json").write_text(json.dumps(report))


def full_numel(module: Any) -> int:
    """Elements of the whole model (a ZeRO-3 parameter's ``ds_numel``; a DTensor's global size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def optimizer_numel(trainer: L.Trainer) -> int:
    """Elements of the optimiser's own (fp32) copy this rank holds: ZeRO's partition, else the
    parameters it steps."""
    optimizer = trainer.optimizers[0]
    partitions = getattr(optimizer, "single_partition_of_fp32_groups", None) or getattr(
        optimizer, "fp32_partitioned_groups_flat", None
    )
    if partitions is not None:
        return sum(p.numel() for p in partitions)
    return sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel()
        for g in optimizer.param_groups
        for p in g["params"]
    )


def main() -> None:
    out, strategy, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    config = load_experiment(
        "mnist1d-multi-teacher",
        [f"runtime.runs_dir={out / 'runs'}", f"runtime.strategy={strategy}", *overrides],
    )
    plan = plan_experiment(config)
    teachers = [ensure_teacher(plan, index)[0] for index in range(len(plan.teachers))]
    system = build_student_system(plan, teachers)
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
        callbacks=[ShardReport(out)],
    )


if __name__ == "__main__":
    main()
