"""Distillation methods: one registered file per paper (see base.py for the contract)."""

from kdlab.methods import ce, kd  # noqa: F401  (registers)
from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import METHODS, create_method, register_method, resolve_weights

__all__ = ["METHODS", "Method", "Paper", "create_method", "register_method", "resolve_weights"]
