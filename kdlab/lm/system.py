"""The LightningModule of language-model distillation: a frozen teacher (or its soft-label store)
teaches a causal-LM student token by token.

One training step: the batch (or, with GKD's probability lambda, the student's own continuations
of its prompts) -> student logits -> teacher logits or stored sparse targets -> the configured
divergence on the target tokens, plus optional next-token cross-entropy on the data. Evaluation
reports bits per byte (the usual compression-style score of a byte-level LM), perplexity, and the
teacher's agreement: how often the student's most likely next token is the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import SumMetric

from kdlab.config import TrainConfig
from kdlab.data.base import counted_rows
from kdlab.lm.config import DistillConfig
from kdlab.lm.generation import batch_prompts, sample_continuations
from kdlab.losses.lm import lm_loss
from kdlab.optim import build_optimizer, build_step_scheduler
from kdlab.schemes.base import _drop_teacher_state, _ignore_missing_teacher_state
from kdlab.schemes.loss_log import LossLog

Batch = dict[str, torch.Tensor]


def causal_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, V]``; positions count real tokens only, so left-padded prompts (generated
    batches) see the same positions as unpadded ones."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


class TokenTranslation(nn.Module):
    """Teacher and student with different token ids for the same tokens (an explicit mapping):
    student ids are translated for the teacher's input, and both logits are cut to the shared
    tokens in one order. Needs the two tokenizers to split text the same way."""

    def __init__(self, vocabulary_map: Any, student_vocab: int) -> None:
        super().__init__()
        self.map = vocabulary_map
        to_teacher = torch.full((student_vocab,), -1, dtype=torch.long)
        to_teacher[vocabulary_map.student_ids] = vocabulary_map.teacher_ids
        self.register_buffer("to_teacher", to_teacher, persistent=False)

    def teacher_input(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        translated = self.to_teacher[input_ids]
        missing = (translated < 0) & attention_mask.bool()
        if missing.any():
            token = int(input_ids[missing][0])
            raise ValueError(f"student token id {token} has no teacher id in the vocabulary mapping")
        return translated.clamp(min=0)

    def project(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.map.project(teacher_logits, student_logits)


class LMDistillation(L.LightningModule):
    """Student + frozen teacher (none for the supervised baseline and for teacher training)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        distill: DistillConfig,
        train: TrainConfig,
        *,
        pad_token_id: int,
        eos_token_id: int | None,
        bytes_per_token: float = 1.0,
        store: Any = None,
        store_missing: str = "residual",
        translation: TokenTranslation | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList([teacher] if teacher is not None else [])
        for parameter in self.teachers.parameters():
            parameter.requires_grad_(False)
        self.distill = distill
        self.train_config = train
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.bytes_per_token = bytes_per_token
        self.store = store
        self.store_missing = store_missing
        self.translation = translation
        self.seed = seed
        self.weights = {"kd": distill.kd_weight if distill.loss != "none" else 0.0, "sft": distill.sft_weight}
        self.loss_log = LossLog()
        names = ("nll", "tokens", "agree", "kl")
        self.sums = nn.ModuleDict({f"{split}_{n}": SumMetric() for split in ("val", "test") for n in names})
        self.register_load_state_dict_post_hook(_ignore_missing_teacher_state)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Without the teacher, also when Lightning's DeepSpeed strategy has removed the module's
        state-dict hooks (``remove_module_hooks`` before evaluation): ZeRO-3's gathered state
        would otherwise carry the teacher's empty partitions."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        _drop_teacher_state(self, state, prefix, None)
        return state

    @property
    def teacher(self) -> nn.Module | None:
        return self.teachers[0] if len(self.teachers) else None

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.eval()

    # -- teacher signal ---------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        assert self.teacher is not None, "the loss needs a teacher"
        input_ids = batch["input_ids"]
        if self.translation is not None:
            input_ids = self.translation.teacher_input(input_ids, batch["attention_mask"])
        return causal_logits(self.teacher, input_ids, batch["attention_mask"])

    def kd_term(self, student_logits: torch.Tensor, batch: Batch, on_policy: bool) -> torch.Tensor:
        mask = batch["labels"] != -100
        options: dict[str, Any] = dict(self.distill.params)
        if self.distill.chunk_size is not None:
            options["chunk_size"] = self.distill.chunk_size
        if self.store is not None and not on_policy:
            from kdlab.lm.store import sparse_forward_kl

            targets = self.store.lookup(batch["index"].cpu())
            return sparse_forward_kl(
                student_logits,
                targets.to(student_logits.device),
                mask=mask,
                temperature=self.distill.temperature,
                missing=self.store_missing,
            )
        teacher_logits = self.teacher_logits(batch)
        if self.translation is not None:
            teacher_logits, student_logits = self.translation.project(teacher_logits, student_logits)
        return lm_loss(self.distill.loss, student_logits, teacher_logits, mask, self.distill.temperature, **options)

    # -- training ---------------------------------------------------------------------------------
    def on_policy_now(self, batch_idx: int) -> bool:
        """GKD's coin, drawn from (seed, epoch, step) alone, so a resumed run flips it the same."""
        if self.distill.on_policy <= 0.0:
            return False
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.current_epoch * 100_003 + batch_idx)
        return bool(torch.rand((), generator=generator) < self.distill.on_policy)

    def loss_terms(self, batch: Batch, batch_idx: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        logits = causal_logits(self.student, batch["input_ids"], batch["attention_mask"])
        if self.weights["sft"]:
            terms["sft"] = next_token_nll(logits, batch["labels"])
        if self.weights["kd"]:
            if self.on_policy_now(batch_idx):
                prompts = batch_prompts(batch, self.distill.generation.prompt_tokens)
                generated = sample_continuations(
                    self.student, prompts, self.distill.generation, self.pad_token_id, self.eos_token_id
                )
                own = causal_logits(self.student, generated["input_ids"], generated["attention_mask"])
                terms["kd"] = self.kd_term(own, generated, on_policy=True)
            else:
                terms["kd"] = self.kd_term(logits, batch, on_policy=False)
        return terms

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch, batch_idx)
        loss = sum(self.weights[name] * term for name, term in terms.items())
        assert isinstance(loss, torch.Tensor), "no loss term has a weight"
        self.loss_log.add(self, {**terms, "loss": loss}, batch["input_ids"].shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        self.loss_log.log_epoch(self)

    # -- evaluation -------------------------------------------------------------------------------
    def _evaluate(self, split: str, batch: Batch, batch_idx: int) -> None:
        labels = batch["labels"]
        mask = labels != -100
        counted = counted_rows(self.trainer, split, batch_idx, len(labels))  # a sharded split's repeats
        if counted is not None:
            mask &= counted.to(mask.device)[:, None]
        logits = causal_logits(self.student, batch["input_ids"], batch["attention_mask"])
        nll = F.cross_entropy(logits[mask].float(), labels[mask], reduction="sum")
        self.sums[f"{split}_nll"].update(nll)
        self.sums[f"{split}_tokens"].update(mask.sum())
        if self.teacher is not None:
            teacher_logits = self.teacher_logits(batch)
            student_logits = logits
            if self.translation is not None:
                teacher_logits, student_logits = self.translation.project(teacher_logits, logits)
            agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & mask
            self.sums[f"{split}_agree"].update(agree.sum())
            if mask.any():  # the mean over no tokens is undefined
                kl = lm_loss("forward_kl", student_logits, teacher_logits, mask) * mask.sum()
                self.sums[f"{split}_kl"].update(kl)

    def _log_evaluation(self, split: str) -> None:
        tokens = self.sums[f"{split}_tokens"].compute().clamp(min=1)
        nats = self.sums[f"{split}_nll"].compute() / tokens
        values = {
            f"{split}/nll": nats,
            f"{split}/bpb": nats / math.log(2) / self.bytes_per_token,
            f"{split}/ppl": nats.exp(),
        }
        if self.teacher is not None:
            values[f"{split}/agreement"] = 100.0 * self.sums[f"{split}_agree"].compute() / tokens
            values[f"{split}/kl"] = self.sums[f"{split}_kl"].compute() / tokens
        for name in ("nll", "tokens", "agree", "kl"):
            self.sums[f"{split}_{name}"].reset()
        self.log_dict(values, prog_bar=split == "val", sync_dist=False)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # -- sharding and optimisation ----------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2: each transformer block of the frozen teacher is sharded on its own and gathered
        only for its forward (``reshard_after_forward``), so a teacher larger than one device fits;
        then the student's blocks. ZeRO-3 partitions everything itself."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        self._sharded = True
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"]
        for teacher in self.teachers:
            for block in transformer_blocks(teacher):
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
            fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
        for block in transformer_blocks(self.student):
            fully_shard(block, mesh=mesh)
        fully_shard(self.student, mesh=mesh)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's trainable parameters (a LoRA student: its adapters only)."""
        return (p for p in self.student.parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.trainable_parameters(), self.train_config.optimizer)
        epochs = self.train_config.epochs
        steps_per_epoch = max(1, math.ceil(self.trainer.estimated_stepping_batches / epochs)) if epochs else 1
        scheduler = build_step_scheduler(optimizer, self.train_config.schedule, epochs, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (labels -100 are skipped)."""
    mask = labels != -100
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it names in ``_no_split_modules``):
    the units FSDP shards and gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
