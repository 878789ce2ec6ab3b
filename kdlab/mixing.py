"""Mixup / CutMix of training batches: inputs mixed, labels replaced by the mixed label distribution.

Images (``[B, C, H, W]``) go through timm's ``Mixup`` (per-batch mode: one ``lam`` per batch, each
sample mixed with the batch reversed). timm's CutMix cuts a box out of the last two axes, which on
``[B, L]`` signals would be the batch axis, so signals get the same recipe here with a contiguous
segment of the last axis as the cut.

After mixing, ``batch["target"]`` is a float ``[B, classes]`` distribution. Cross-entropy takes it
as it is, and its ``label_smoothing`` smooths it exactly as timm folds smoothing into mixed targets
(``(1 - eps) * target + eps / classes``). Code that reads labels as class indices (DKD's target
split, CRD's negatives, a soft-label store read by sample index) would be wrong on mixed samples,
so :func:`check_mixing` refuses it before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup

from kdlab.config import MixConfig
from kdlab.data.base import Batch
from kdlab.errors import ConfigError

if TYPE_CHECKING:
    from kdlab.schemes.base import SystemParts


class BatchMixer:
    """Mix one training batch (numpy's global generator draws, as in timm; kdlab reseeds it per
    epoch, so a resumed run mixes the same way)."""

    def __init__(self, cfg: MixConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes
        self.images = Mixup(
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            prob=cfg.prob,
            switch_prob=cfg.switch_prob,
            mode="batch",
            label_smoothing=0.0,  # the cross-entropy applies train.label_smoothing
            num_classes=num_classes,
        )

    def __call__(self, batch: Batch, key: str = "input") -> Batch:
        inputs, target = batch[key], batch["target"]  # type: ignore[literal-required]
        if inputs.dim() == 4:
            mixed, soft = self._images(inputs, target)
        else:
            mixed, soft = self._signals(inputs, target)
        return {**batch, key: mixed, "target": soft}  # type: ignore[return-value]

    def _images(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm refuses odd batches; the odd one out (a last, short batch) stays unmixed.
        even = len(inputs) - len(inputs) % 2
        soft = F.one_hot(target, self.num_classes).float()
        if even == 0:
            return inputs, soft
        mixed, mixed_soft = self.images(inputs[:even].clone(), target[:even])
        return torch.cat([mixed, inputs[even:]]), torch.cat([mixed_soft.to(soft), soft[even:]])

    def _signals(self, inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = F.one_hot(target, self.num_classes).to(torch.float32)
        lam, use_cutmix = self._draw()
        if lam == 1.0:
            return inputs, soft
        flipped = inputs.flip(0)
        if use_cutmix:
            length = inputs.shape[-1]
            cut = int(length * (1.0 - lam))
            centre = int(np.random.randint(0, length))
            lo, hi = max(centre - cut // 2, 0), min(centre + (cut + 1) // 2, length)
            mixed = inputs.clone()
            mixed[..., lo:hi] = flipped[..., lo:hi]
            lam = 1.0 - (hi - lo) / length  # the share of the signal that is still its own
        else:
            mixed = inputs * lam + flipped * (1.0 - lam)
        return mixed, soft * lam + soft.flip(0) * (1.0 - lam)

    def _draw(self) -> tuple[float, bool]:
        """timm's per-batch draw: mix with ``prob``; CutMix with ``switch_prob`` when both are on."""
        cfg = self.cfg
        if np.random.rand() >= cfg.prob:
            return 1.0, False
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = bool(np.random.rand() < cfg.switch_prob)
        else:
            use_cutmix = cfg.cutmix_alpha > 0
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        return float(np.random.beta(alpha, alpha)), use_cutmix


def check_mixing(parts: SystemParts, own_step: bool = False) -> None:
    """Refuse mixing where labels or inputs would no longer match what is mixed (before training).
    ``own_step``: the scheme has its own training step, which does not mix."""
    if not parts.train.mix.enabled:
        return
    if own_step:
        raise ConfigError("train.mix (mixup/cutmix) is not supported by this scheme: it runs its own training step")
    if parts.method.uses_labels:
        raise ConfigError(
            f"train.mix (mixup/cutmix) cannot be used with method '{parts.method.name}': its terms read "
            "class labels, which a mixed sample does not have"
        )
    if parts.teachers and parts.teacher_input_key != parts.input_key:
        raise ConfigError("train.mix (mixup/cutmix) is not supported on paired data: teacher and student inputs differ")
    if parts.honour_labelled and parts.labelled_fraction < 1.0:
        raise ConfigError("train.mix (mixup/cutmix) is not supported when some samples are unlabelled")
    # Here, not at the top: kdlab.schemes imports this module while it initialises.
    from kdlab.schemes.teacher import StoredTeacher

    if any(isinstance(t, StoredTeacher) for t in parts.teachers):
        raise ConfigError(
            "train.mix (mixup/cutmix) needs the teacher's outputs on the mixed inputs: use teacher.source=model, "
            "not a soft-label store"
        )
