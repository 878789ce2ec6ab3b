"""Scheme registry: a scheme is the LightningModule that owns the shape of the training loop."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L

from kdlab.registry import Registry

SCHEMES: Registry[type[L.LightningModule]] = Registry("scheme")


def register_scheme(name: str, description: str) -> Callable[[type[L.LightningModule]], type[L.LightningModule]]:
    return SCHEMES.register(name, description)
