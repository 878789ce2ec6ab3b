"""Self-distillation, Be Your Own Teacher (Zhang et al., ICCV 2019).

An auxiliary exit (a bottleneck that maps the stage's map to the deepest stage's channels, then a
classifier) follows every stage but the last. Every exit learns from the labels; the shallow exits
also learn from the deepest one, through the configured response method (BYOT: KD at T=3) and an
L2 hint between their bottleneck feature and the deepest feature. Coefficients default to the
widely used BYOT re-implementation (loss coefficient 0.3, feature coefficient 0.03, T=3): set
``method.params.temperature=3`` and ``method.weights {ce: 1, kd: 0.3}`` with ``exit_ce_weight:
0.7``. Exits are scored (``val/exit1/top1`` shallowest, ...); only the student is exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.methods.adapters import spatial_layers
from kdlab.schemes.base import DistillationScheme, SystemParts, probing
from kdlab.schemes.registry import register_scheme

STAGES = "stages"


@dataclass
class SelfDistillationOptions:
    exit_ce_weight: float = 0.7  # label term of each shallow exit (1 - the loss coefficient)
    feature_weight: float = 0.03  # L2 hint: each exit's bottleneck feature -> the deepest feature


class ExitHead(nn.Module):
    """A BYOT bottleneck: 1x1 conv to the deepest channels, stride-2 3x3 convs until the map is
    no larger than the deepest one, global pooling (the hint feature), then a classifier."""

    def __init__(self, shape: torch.Size, deepest: torch.Size, num_classes: int) -> None:
        super().__init__()
        layers = spatial_layers(shape, "a BYOT exit's stage output")
        channels, size = deepest[1], list(shape[2:])
        blocks: list[nn.Module] = [
            layers.conv(shape[1], channels, 1, bias=False),
            layers.batch_norm(channels),
            nn.ReLU(),
        ]
        while any(s > t for s, t in zip(size, deepest[2:], strict=True)):
            blocks += [layers.conv(channels, channels, 3, stride=2, padding=1, bias=False), layers.batch_norm(channels)]
            blocks.append(nn.ReLU())
            size = [(s + 1) // 2 for s in size]
        self.bottleneck = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hint = self.bottleneck(feature).flatten(2).mean(-1)
        return self.classifier(hint), hint


@register_scheme("byot", "self-distillation: auxiliary exits after each stage learn from the deepest (BYOT)")
class SelfDistillation(DistillationScheme):
    example = "mnist1d-byot"
    Options = SelfDistillationOptions
    teachers_taken = "none"

    def __init__(self, parts: SystemParts) -> None:
        super().__init__(parts)
        if parts.method.student_taps or parts.method.teacher_taps or parts.method.init_epochs:
            raise ConfigError(
                f"byot: exits distil through a response method (kd, dist, ...); '{parts.method.name}' needs features"
            )
        self.weights.update({"exit_ce": self.options.exit_ce_weight, "exit_feature": self.options.feature_weight})
        self.stage_taps = FeatureTaps(parts.student, (STAGES,), role="student")
        assert parts.example is not None
        with probing(parts.student):
            stages = tapped_forward(parts.student, self.stage_taps, parts.example[self.input_key]).features[STAGES]
        if len(stages) < 2:
            raise ConfigError(f"byot: the student has {len(stages)} stage(s); exits need at least 2")
        deepest = stages[-1].shape
        self.exits = nn.ModuleList([ExitHead(s.shape, deepest, parts.num_classes) for s in stages[:-1]])

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        logits = self.student(x)
        stages = self.stage_taps.collect()[STAGES]
        outputs = [head(stage) for head, stage in zip(self.exits, stages[:-1], strict=True)]
        deepest = stages[-1].flatten(2).mean(-1)
        return logits, [o[0] for o in outputs], [o[1] for o in outputs], deepest

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits, exit_logits, hints, deepest = self._forward(batch[self.input_key])  # type: ignore[literal-required]
        teacher = ModelOutput(logits.detach())
        terms: dict[str, torch.Tensor] = {"ce": self.supervised_ce(logits, batch)}
        for k, (exit_logit, hint) in enumerate(zip(exit_logits, hints, strict=True)):
            ce = self.supervised_ce(exit_logit, batch)
            self.diagnostics[f"exit{k + 1}_ce"] = ce.detach()
            parts = {"exit_ce": ce, "exit_feature": (hint - deepest.detach()).pow(2).mean()}
            parts.update(self.method(ModelOutput(exit_logit), teacher, batch))
            for name, value in parts.items():
                terms[name] = terms[name] + value if name in terms else value
        return terms

    def eval_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits, exit_logits, _, _ = self._forward(batch[self.input_key])  # type: ignore[literal-required]
        return {"": logits, **{f"exit{k + 1}": z for k, z in enumerate(exit_logits)}}

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        return self.exits.parameters()
