"""Distillation methods: one registered file per paper (see base.py for the contract).

Every module in this package is imported here, so a new method is just a new file with a
``@register_method`` class: no list to edit.
"""

import importlib
import pkgutil

from kdlab.methods.base import Method, Paper
from kdlab.methods.registry import METHODS, create_method, register_method, resolve_weights

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("adapters", "base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "Paper", "create_method", "register_method", "resolve_weights"]
