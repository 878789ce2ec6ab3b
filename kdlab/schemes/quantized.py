"""Quantized distillation (Polino, Pascanu, Alistarh, ICLR 2018): the student trains with fake
quantisation of weights and activations at ``bits`` (straight-through estimator) while distilling
from a float teacher through the method; afterwards it converts to a real int8 model whose test
accuracy and size are reported beside the fake-quantized (and, in a table, the float) student.

Quantized students distil through logits only: FX preparation fuses and renames their layers, so
feature taps do not survive (see :mod:`kdlab.quantization`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.metrics import ClassificationMetrics
from kdlab.quantization import (
    VALID_BITS,
    convert_to_int8,
    freeze_batchnorm,
    freeze_observers,
    model_size_bytes,
    prepare_fake_quant,
)
from kdlab.schemes.base import SystemParts
from kdlab.schemes.offline import OfflineDistillation
from kdlab.schemes.registry import register_scheme


@contextmanager
def _int8_kernels_allowed() -> Iterator[None]:
    """torch flags the quantized CPU ops (their output resize) under ``runtime.deterministic``,
    though one thread computes the same int8 result every time; allow them for the evaluation."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@dataclass
class QuantizedOptions:
    bits: int = 8  # weights: 2..8
    activation_bits: int = 8  # activations: 2..8 (Polino et al. quantize weights; 8 keeps logits fine)
    # The last epochs fine-tune with fixed quantisation ranges and BN statistics (torch's QAT recipe),
    # so the int8 model computes what was trained.
    freeze_epochs: int = 1

    def check(self) -> None:
        for name in ("bits", "activation_bits"):
            if getattr(self, name) not in VALID_BITS:
                valid = ", ".join(map(str, VALID_BITS))
                raise ConfigError(f"quantized: {name} must be one of {valid}, got {getattr(self, name)}")


@register_scheme("quantized", "quantization-aware student (fake-quant 8/4/2 bits, STE) distilled from a float teacher")
class QuantizedDistillation(OfflineDistillation):
    example = "mnist1d-quantized"
    Options = QuantizedOptions

    def __init__(self, parts: SystemParts) -> None:
        if parts.method.student_taps or parts.method.init_epochs:
            raise ConfigError(
                f"quantized: method '{parts.method.name}' needs student features, which a quantized student"
                " does not keep; use a response method (kd, dkd, dist, ls_kd) or ce"
            )
        super().__init__(parts)
        assert parts.example is not None
        self.student = prepare_fake_quant(
            parts.student, self.options.bits, parts.example[self.input_key], self.options.activation_bits
        )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # Never from the first epoch: the observers need training batches to learn ranges first.
        if self.current_epoch >= max(1, self.train_config.epochs - self.options.freeze_epochs):
            freeze_observers(self.student)
            freeze_batchnorm(self.student)

    @torch.no_grad()
    def final_metrics(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """The real int8 model on the test split (CPU int8 kernels), and both sizes."""
        int8 = convert_to_int8(self.student)
        metrics = ClassificationMetrics(self.parts.num_classes, self.parts.calibration_bins)
        with _int8_kernels_allowed():
            for batch in datamodule.test_dataloader():
                metrics.update(int8(batch[self.input_key].cpu()), batch["target"].cpu())
        int8_bytes = model_size_bytes(int8)
        float_bytes = model_size_bytes(self.parts.student)  # the float twin: same architecture, same size
        self._int8 = int8
        return {
            **{f"test/int8/{k}": float(v) for k, v in metrics.compute().items()},
            "size_bytes/float": float_bytes,
            "size_bytes/int8": int8_bytes,
            "size_ratio/int8_to_float": round(int8_bytes / float_bytes, 4),
            "bits": self.options.bits,
            "activation_bits": self.options.activation_bits,
        }

    def export_extra(self) -> dict[str, Any]:
        options = self.options
        return {"quantized": {"bits": options.bits, "activation_bits": options.activation_bits, "format": "fx-int8"}}

    def export_model(self) -> nn.Module:
        """The int8 model (converted in :meth:`final_metrics`, else now)."""
        return getattr(self, "_int8", None) or convert_to_int8(self.student)
