"""Distillation schemes (LightningModules); each owns the loop shape, methods own the math."""

from kdlab.schemes import offline  # noqa: F401  (registers)
from kdlab.schemes.registry import SCHEMES, register_scheme
from kdlab.schemes.teacher import FrozenTeacher

__all__ = ["SCHEMES", "FrozenTeacher", "register_scheme"]
