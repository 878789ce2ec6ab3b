"""Sampling continuations, for sequence-level KD (the teacher's) and on-policy batches (the student's).

Both turn prompts into training batches of the shared contract (``input_ids``, ``labels`` with
-100 where no loss, ``attention_mask``, ``index``): the loss then counts the generated tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlab.lm.config import GenerationConfig

IGNORE = -100


@dataclass(frozen=True)
class Prompts:
    """Left-padded prompts (``mask`` 1 on real tokens) and the samples they came from."""

    ids: torch.Tensor
    mask: torch.Tensor
    index: torch.Tensor


def batch_prompts(batch: dict[str, torch.Tensor], prompt_tokens: int) -> Prompts:
    """A batch's prompts: its own (prompt/response data), or the first ``prompt_tokens`` of each
    block (a text corpus, whose blocks have no prompt)."""
    if "prompt_ids" in batch:
        return Prompts(batch["prompt_ids"], batch["prompt_attention_mask"], batch["index"])
    ids = batch["input_ids"][:, :prompt_tokens]
    return Prompts(ids, torch.ones_like(ids), batch["index"])


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompts: Prompts, config: GenerationConfig, pad_token_id: int, eos_token_id: int | None
) -> dict[str, torch.Tensor]:
    """Sample ``max_new_tokens`` after each prompt and return it as a training batch whose labels
    are the sampled tokens (prompt and padding: -100). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=prompts.ids,
            attention_mask=prompts.mask,
            do_sample=True,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k if config.top_k is not None else 0,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
    finally:
        model.train(was_training)
    return continuation_batch(prompts, sequences, pad_token_id, eos_token_id)


def continuation_batch(
    prompts: Prompts, sequences: torch.Tensor, pad_token_id: int, eos_token_id: int | None
) -> dict[str, torch.Tensor]:
    """``sequences`` = left-padded prompt + generated tokens (padded after an early eos). Labels
    are the next tokens from the last prompt position on, up to and including the first eos."""
    prompt_len = prompts.ids.shape[1]
    generated = sequences[:, prompt_len:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    if eos_token_id is not None:
        ended = (generated == eos_token_id).long().cumsum(dim=1)
        # tokens after the first eos are padding; the eos itself is a target
        keep = (ended == 0) | ((ended == 1) & (generated == eos_token_id))
    attention = torch.cat([prompts.mask, keep.long()], dim=1)
    targets = torch.full_like(sequences, IGNORE)
    targets[:, prompt_len - 1 : -1] = torch.where(keep, generated, torch.full_like(generated, IGNORE))
    input_ids = torch.where(attention.bool(), sequences, torch.full_like(sequences, pad_token_id))
    return {"input_ids": input_ids, "labels": targets, "attention_mask": attention, "index": prompts.index}
