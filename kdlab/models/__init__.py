"""Model zoo: kdlab's registry of named architectures, each also registered into timm's registry.

``create_model(name)`` builds a kdlab zoo model or, failing that, any timm model by name.
Importing this package registers every zoo model, so ``timm.create_model('cifar_resnet8x4')`` works.
"""

from kdlab.models import (
    cifar,  # noqa: F401  (registers)
    mnist1d,  # noqa: F401  (registers)
    spectrogram,  # noqa: F401  (registers)
)
from kdlab.models.registry import MODELS, count_parameters, create_model, register_model

__all__ = ["MODELS", "count_parameters", "create_model", "register_model"]
