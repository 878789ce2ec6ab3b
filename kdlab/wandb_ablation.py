"""A run's place in W&B: job type, tags, and the keys a table or sweep varies, as top-level config.

W&B groups runs by group and job type, filters by tag, and draws parallel coordinates from scalar
top-level config keys. All of that is derived here from the run's spec (what the run is) and its
runtime (which table or sweep it belongs to); the runtime is never hashed, so none of it renames a
run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kdlab.config import RuntimeConfig, load_yaml
from kdlab.runs import TEACHER_GROUP

MAX_TAG_LENGTH = 64  # W&B refuses longer tags
STUDENT_STAGES = ("student", "student-init", "assistant")


def ablation_runtime(
    runtime: RuntimeConfig, group: str, swept: Mapping[str, Any], tags: Sequence[str] = ()
) -> RuntimeConfig:
    """The runtime of one cell of a table or sweep: the shared W&B ``group`` (a group the user named
    with ``runtime.wandb_group`` wins), the cell's swept ``key -> value`` and extra tags."""
    return replace(
        runtime,
        wandb_group=runtime.wandb_group or group,
        wandb_sweep={**runtime.wandb_sweep, **{key: scalar(value) for key, value in swept.items()}},
        wandb_tags=list(dict.fromkeys([*runtime.wandb_tags, *tags])),
    )


def swept_values(overrides: Sequence[str]) -> dict[str, Any]:
    """Dotted ``key=value`` overrides as ``{key: value}``, values typed as the config loader types them."""
    values: dict[str, Any] = {}
    for override in overrides:
        key = override.partition("=")[0].strip()
        value = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        values[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return values


def scalar(value: Any) -> Any:
    """A value parallel coordinates can plot: scalars as they are, anything else as compact JSON."""
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)


def wandb_config(spec: Mapping[str, Any], sweep: Mapping[str, Any]) -> dict[str, Any]:
    """The run's spec plus, when it belongs to an ablation, each swept key at the top level and all of
    them under ``sweep``. The spec wins a clash: it is what this run is (a teacher trained by a
    cell keeps its own seed)."""
    if not sweep:
        return dict(spec)
    return {**sweep, **spec, "sweep": dict(sweep)}


def run_identity(spec: Mapping[str, Any], runs_dir: str | Path, job_type: str) -> tuple[str, list[str]]:
    """Job type (the method for a student, else the caller's) and tags: stage, dataset, scheme,
    method, model and the teacher->student pair, as ``kind:value`` so they filter unambiguously."""
    stage = str(spec.get("stage", job_type))
    tags = [f"stage:{stage}", f"dataset:{spec.get('data', {}).get('name')}"]
    if stage not in STUDENT_STAGES:
        tags.append(f"model:{spec.get('model', {}).get('name')}")
    else:
        job_type = str(spec.get("method", {}).get("name", job_type))
        student = spec.get("student", {}).get("model", {}).get("name")
        tags += [f"method:{job_type}", f"model:{student}"]
        if "scheme" in spec:
            tags.append(f"scheme:{spec['scheme']}")
        teachers = _teacher_models(spec, Path(runs_dir))
        if teachers:
            tags.append(f"pair:{'+'.join(teachers)}->{student}")
    return job_type, [tag[:MAX_TAG_LENGTH] for tag in tags]


def _teacher_models(spec: Mapping[str, Any], runs_dir: Path) -> list[str]:
    """The teachers' model names, from the teachers' own run folders: a student's spec names each
    teacher by run hash only, and a teacher's run is written before any of its students train. A
    teacher known only by a soft-label store from elsewhere is left out."""
    entries = spec.get("teachers") or ([spec["teacher"]] if "teacher" in spec else [])
    names = []
    for entry in entries:
        for run_hash in entry.get("ensemble") or [entry.get("run")]:
            path = runs_dir / TEACHER_GROUP / str(run_hash) / "config.yaml"
            if path.exists():
                names.append(str(load_yaml(path).get("model", {}).get("name")))
    return list(dict.fromkeys(names))
