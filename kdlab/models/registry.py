"""Registration glue: a zoo model lives in kdlab's registry and, under its timm name, in timm's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from torch import nn

from kdlab.errors import KdlabError, UnknownNameError, did_you_mean
from kdlab.models import timm_entrypoints
from kdlab.registry import Registry
from kdlab.signature import check_kwargs

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_model(
    name: str, timm_name: str, description: str, input_kind: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model builder as ``name`` in kdlab and as ``timm_name`` in timm.

    ``input_kind`` ("image" or "signal") is shown by `kdlab list models`; timm names carry a
    dataset prefix (``cifar_vgg13``) because several paper names (vgg13, resnet50) already exist
    in timm with different architectures.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            if pretrained:
                raise KdlabError(f"model '{name}' has no pretrained weights; load a checkpoint instead")
            for key in _TIMM_ONLY_KWARGS:
                kwargs.pop(key, None)
            return builder(**kwargs)

        entrypoint.__name__ = entrypoint.__qualname__ = timm_name
        entrypoint.__module__ = timm_entrypoints.__name__
        entrypoint.__doc__ = builder.__doc__
        setattr(timm_entrypoints, timm_name, entrypoint)
        timm.models.register_model(entrypoint)
        MODELS.add(name, builder, description, timm_name=timm_name, input=input_kind)
        return builder

    return decorate


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a kdlab zoo model (options checked against its signature) or any timm model."""
    if name in MODELS:
        builder = MODELS.get(name)
        return builder(**check_kwargs(builder, kwargs, f"model '{name}'"))
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, **kwargs)
    hint = did_you_mean(name, MODELS.names())
    raise UnknownNameError(
        f"unknown model '{name}'{'; ' + hint if hint else ''} (kdlab models: {', '.join(MODELS.names())};"
        " any name from timm.list_models() also works)"
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
