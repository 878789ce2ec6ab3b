"""Distillation schemes (LightningModules); each owns the loop shape, methods own the math."""

from kdlab.schemes import offline  # noqa: F401  (registers; after the base it imports)
from kdlab.schemes.base import DistillationScheme, SystemParts
from kdlab.schemes.registry import SCHEMES, parse_options, register_scheme
from kdlab.schemes.teacher import FrozenTeacher

__all__ = ["SCHEMES", "DistillationScheme", "FrozenTeacher", "SystemParts", "parse_options", "register_scheme"]
