"""Scheme registry: a scheme is the LightningModule that owns the shape of the training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdlab.errors import ConfigError, did_you_mean
from kdlab.registry import Registry

if TYPE_CHECKING:
    from kdlab.schemes.base import DistillationScheme

SCHEMES: Registry[type[DistillationScheme]] = Registry("scheme")


def register_scheme(name: str, description: str) -> Callable[[type[DistillationScheme]], type[DistillationScheme]]:
    return SCHEMES.register(name, description)


def parse_options(name: str, params: dict[str, Any]) -> Any:
    """``scheme_params`` typed by the scheme's ``Options`` dataclass; unknown or ill-typed keys
    fail with the scheme's valid options."""
    options_cls = SCHEMES.get(name).Options
    valid = [f.name for f in fields(options_cls)]
    for key in params:
        if key not in valid:
            hint = did_you_mean(key, valid)
            listing = ", ".join(valid) if valid else "none"
            raise ConfigError(
                f"scheme '{name}' has no option '{key}'{'; ' + hint if hint else ''} (options: {listing})"
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_cls), OmegaConf.create(dict(params)))
        options = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError(f"scheme '{name}': bad scheme_params.{getattr(error, 'key', '')}: {first}") from None
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options
