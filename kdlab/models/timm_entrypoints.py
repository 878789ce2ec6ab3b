"""Home of the timm entrypoints of kdlab's zoo (``cifar_resnet8x4``, ``mnist1d_cnn``, ...).

timm files every registered entrypoint under the module it lives in; giving them one module of
their own keeps them out of timm's ``resnet``/``vgg`` groups and out of the builders' ``__all__``.
"""

__all__: list[str] = []
