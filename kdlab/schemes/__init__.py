"""Distillation schemes (LightningModules); each owns the loop shape, methods own the math."""

from kdlab.schemes import (  # noqa: F401  (registers; after the base they import)
    adversarial,
    assistant,
    cross_modal,
    multi_teacher,
    offline,
    online,
    quantized,
    self_distill,
)
from kdlab.schemes.base import DistillationScheme, SystemParts
from kdlab.schemes.registry import SCHEMES, parse_options, register_scheme
from kdlab.schemes.teacher import FrozenTeacher

__all__ = ["SCHEMES", "DistillationScheme", "FrozenTeacher", "SystemParts", "parse_options", "register_scheme"]
