"""The byte-level tokenizer every kdlab LM preset uses, and token helpers shared by the text data.

ByT5's tokenizer without sentinels (pure Python, nothing to download): pad 0, eos 1, unk 2, and
byte b is token b + 3, so any text in any language has a tokenization and bits per byte are
bits per token.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

from kdlab.errors import ConfigError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b is token b + 3 in the byte tokenizer
BYTE_VOCAB_SIZE = 259
IGNORE_INDEX = -100


def byte_tokenizer() -> Any:
    """The byte-level tokenizer (pure Python, nothing to download): pad 0, eos 1, unk 2, byte b -> b + 3."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def encode_bytes(data: bytes) -> torch.Tensor:
    """The byte tokenizer's ids of ``data`` (no eos), vectorised: tokenising the stdlib takes
    milliseconds instead of the tokenizer's per-character Python loop."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET)


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` maps byte b to b + 3 (so :func:`encode_bytes` may replace it)."""
    return (
        type(tokenizer).__name__ == "ByT5Tokenizer"
        and getattr(tokenizer, "offset", None) == BYTE_OFFSET
        and tokenizer.pad_token_id == PAD_ID
        and tokenizer.eos_token_id == EOS_ID
    )


def encode_text(text: str, tokenizer: Any) -> torch.Tensor:
    """``text``'s ids without special tokens, as a 1-D LongTensor."""
    if is_byte_tokenizer(tokenizer):
        return encode_bytes(text.encode("utf-8"))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def eos_id_of(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos token; text data ends sequences with it")
    return int(tokenizer.eos_token_id)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (GPT-2-style tokenizers have no pad token)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id_of(tokenizer)


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (sha1): the same split on every machine."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
