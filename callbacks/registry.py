"""Callback registry: training-time behaviours a config can switch on by name, with checked options."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from kdlab.errors import ConfigError
from kdlab.registry import Registry
from kdlab.signature import accepted_kwargs, check_kwargs

CALLBACKS: Registry[type[Callback]] = Registry("callback")


def register_callback(name: str, description: str = "") -> Callable[[type[Callback]], type[Callback]]:
    """Class decorator: make a callback available to configs as ``name``."""
    return CALLBACKS.register(name, description)


def create_callback(name: str, params: Mapping[str, Any]) -> Callback:
    """Instantiate a registered callback; a bad name, option or value fails before training."""
    cls = CALLBACKS.get(name)
    what = f"callback '{name}'"
    checked = check_kwargs(cls, params, what)
    options = accepted_kwargs(cls)
    missing = [key for key, p in options.items() if p.default is inspect.Parameter.empty and key not in checked]
    if missing:
        raise ConfigError(f"{what}: missing option(s) {', '.join(missing)} (valid: {', '.join(options)})")
    return cls(**checked)
