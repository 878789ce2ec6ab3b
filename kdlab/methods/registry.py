"""Method registry: one file per method registers its class here with ``@register_method``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from kdlab.config import MethodConfig
from kdlab.errors import ConfigError, did_you_mean
from kdlab.methods.base import Method
from kdlab.registry import Registry
from kdlab.signature import accepted_kwargs, check_kwargs

METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    description = (cls.__doc__ or "").strip().splitlines()[0]
    if cls.paper is not None:
        description += f" [{cls.paper.authors} {cls.paper.year}]"
    return METHODS.add(cls.name, cls, description)


def create_method(config: MethodConfig) -> Method:
    """Instantiate a method with its checked hyper-parameters (a bad value is a ConfigError)."""
    cls = METHODS.get(config.name)
    params = check_kwargs(cls, config.params, f"method '{config.name}'")
    try:
        return cls(**params)
    except ValueError as error:
        raise ConfigError(f"method '{config.name}': {error}") from None


def resolve_weights(cls: type[Method], overrides: Mapping[str, float]) -> dict[str, float]:
    """The paper's default loss weights with the user's overrides; unknown terms are an error."""
    for term in overrides:
        if term not in cls.default_weights:
            hint = did_you_mean(term, cls.default_weights)
            raise ConfigError(
                f"method '{cls.name}' has no loss term '{term}'{'; ' + hint if hint else ''}"
                f" (terms: {', '.join(cls.default_weights)})"
            )
    return {**cls.default_weights, **{k: float(v) for k, v in overrides.items()}}


def resolved_params(cls: type[Method], params: Mapping[str, Any]) -> dict[str, Any]:
    """Every hyper-parameter the method will use: its signature defaults with the user's values."""
    defaults = {name: p.default for name, p in accepted_kwargs(cls).items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **params}
