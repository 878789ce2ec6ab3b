"""Adversarial distillation: a discriminator tells teacher outputs from student outputs; the
student, as the generator, learns to fool it while also matching soft labels through the method
(Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge Distillation
with Conditional Adversarial Networks", ICLR-W 2018; Wang et al., KDGAN, NeurIPS 2018).

Manual optimisation: per batch, ``d_steps`` discriminator updates (BCE on teacher=1 vs
student=0, plus an optional WGAN-GP-style gradient penalty on interpolates), then one student
update on ``weight * method terms + adv_weight * (non-saturating) generator loss``. The
discriminator sees logits, the penultimate embedding (the student's through a learned linear map
to the teacher's width), or both. Logged: ``d_loss``, ``d_acc``, the student's terms and ``adv``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.schemes.base import DistillationScheme, SystemParts, probing
from kdlab.schemes.registry import register_scheme

EMBEDDING = "embedding"
INPUTS = ("logits", "embedding", "both")


@dataclass
class AdversarialOptions:
    inputs: str = "logits"  # logits | embedding | both: what the discriminator sees
    hidden: int = 128  # discriminator width (two hidden layers)
    d_lr: float = 1e-3  # discriminator Adam learning rate
    d_steps: int = 1  # discriminator updates per student update (k-step)
    gp_weight: float = 0.0  # gradient penalty (0: off)
    adv_weight: float = 0.1  # weight of the generator term "adv"

    def check(self) -> None:
        if self.inputs not in INPUTS:
            raise ConfigError(f"adversarial: unknown inputs '{self.inputs}' (valid: {', '.join(INPUTS)})")
        if self.d_steps < 1:
            raise ConfigError(f"adversarial: d_steps must be at least 1, got {self.d_steps}")


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Gulrajani et al. (2017): ``E[(||grad D(x_hat)|| - 1)^2]`` on random interpolates."""
    mix = torch.rand(real.shape[0], 1, device=real.device, dtype=real.dtype)
    interpolates = (mix * real + (1 - mix) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(interpolates).sum(), interpolates, create_graph=True)
    return (grad.norm(dim=1) - 1).pow(2).mean()


@register_scheme("adversarial", "GAN-style: a discriminator tells teacher from student outputs; the student fools it")
class AdversarialDistillation(DistillationScheme):
    example = "mnist1d-adversarial"
    reads_teacher_store = True
    Options = AdversarialOptions
    teachers_taken = "one"

    def __init__(self, parts: SystemParts) -> None:
        super().__init__(parts)
        if parts.train.gradient_clip_val is not None:
            raise ConfigError("adversarial: gradient clipping is not supported with its manual optimisation")
        self.automatic_optimization = False
        options: AdversarialOptions = self.options
        self.weights.setdefault("adv", options.adv_weight)
        self.uses_embedding = options.inputs in ("embedding", "both")
        self.embedding_taps = FeatureTaps(parts.student, (EMBEDDING,), role="student") if self.uses_embedding else None
        if self.uses_embedding and EMBEDDING not in parts.method.teacher_taps:
            for teacher in parts.teachers:  # the teacher's embedding too
                teacher.taps.remove()
                teacher.taps = FeatureTaps(teacher.model, (*parts.method.teacher_taps, EMBEDDING), role="teacher")
        assert parts.example is not None
        with probing(parts.student):
            student = self._views(self.student_output(parts.example))
            teacher = self._views(self.teacher_outputs(parts.example)[0])
        width = sum(t.shape[1] for t in teacher)
        self.student_map = (
            nn.Linear(student[-1].shape[1], teacher[-1].shape[1]) if self.uses_embedding else nn.Identity()
        )
        self.discriminator = nn.Sequential(
            nn.Linear(width, options.hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(options.hidden, options.hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(options.hidden, 1),
        )

    def _views(self, out: ModelOutput) -> list[torch.Tensor]:
        views = [] if self.options.inputs == "embedding" else [out.logits]
        if self.uses_embedding:
            views.append(out.features[EMBEDDING].flatten(1))
        return views

    def student_output(self, batch: Batch) -> ModelOutput:
        out = tapped_forward(self.student, self.student_taps, batch[self.input_key])  # type: ignore[literal-required]
        if self.embedding_taps is not None:
            out.features.update(self.embedding_taps.collect())
        return out

    def _d_input(self, views: list[torch.Tensor], student: bool) -> torch.Tensor:
        if student and self.uses_embedding:
            views = [*views[:-1], self.student_map(views[-1])]
        return torch.cat(views, dim=1)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The student's terms with the discriminator fixed (what the dry run checks)."""
        student = self.student_output(batch)
        teacher = self.teacher_outputs(batch)[0]
        return self._student_terms(student, teacher, self._d_input(self._views(student), student=True), batch)

    def _student_terms(
        self, student: ModelOutput, teacher: ModelOutput, fake: torch.Tensor, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """The method's terms plus ``adv``: the non-saturating generator loss of fooling D."""
        terms = self.method_terms(student, teacher, batch)
        generated = self.discriminator(fake)
        terms["adv"] = F.binary_cross_entropy_with_logits(generated, torch.ones_like(generated))
        return terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        student_opt, d_opt = self.optimizers()  # type: ignore[misc]
        student = self.student_output(batch)
        teacher = self.teacher_outputs(batch)[0]
        real = self._d_input(self._views(teacher), student=False)
        fake = self._d_input(self._views(student), student=True)
        for _ in range(self.options.d_steps):
            real_logit, fake_logit = self.discriminator(real), self.discriminator(fake.detach())
            d_loss = F.binary_cross_entropy_with_logits(
                real_logit, torch.ones_like(real_logit)
            ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
            if self.options.gp_weight:
                d_loss = d_loss + self.options.gp_weight * gradient_penalty(self.discriminator, real, fake.detach())
            d_opt.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            d_opt.step()
        accuracy = ((real_logit > 0).float().mean() + (fake_logit < 0).float().mean()) / 2
        self.diagnostics.update({"d_loss": d_loss.detach(), "d_acc": accuracy.detach()})

        terms = self._student_terms(student, teacher, fake, batch)
        loss = self.weighted_sum(terms)
        student_opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        student_opt.step()
        self.log_terms({**terms, "loss": loss}, batch)
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        # Manual optimisation steps its scheduler itself: to the epoch, so a resume lands right.
        scheduler = self.lr_schedulers()
        while scheduler is not None and scheduler.last_epoch < self.current_epoch:  # type: ignore[union-attr]
            scheduler.step()  # type: ignore[union-attr]

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        return self.student_map.parameters()

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.options.d_lr, betas=(0.5, 0.999))
        return [config["optimizer"], d_opt], [config["lr_scheduler"]]
