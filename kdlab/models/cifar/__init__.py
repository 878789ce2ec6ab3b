"""CIFAR model zoo of CRD (Tian et al. 2020) and DKD (Zhao et al. 2022), sized as RepDistiller's models.

Importing this package registers every model (kdlab name ``resnet8x4``, timm name ``cifar_resnet8x4``).
Each is a plain module returning logits, with stages ``stem``/``layer1``.../``pool``/``fc`` for hooks.
"""

from kdlab.models.cifar import (  # noqa: F401  (registers)
    mobilenetv2,
    resnet,
    resnet_v2,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)
