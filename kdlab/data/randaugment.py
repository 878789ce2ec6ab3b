"""RandAugment (Cubuk et al. 2020, arXiv:1909.13719) for image datasets, by timm's implementation.

``data.kwargs.randaugment`` takes timm's config string (``rand-m9-mstd0.5``: magnitude 9 with
std 0.5; ``-n3``: three ops per image; ``-inc1``: increasing-severity ops). timm skips a section
it cannot parse without a word, so the string is checked here and a bad one fails at construction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from timm.data.auto_augment import rand_augment_transform

from kdlab.errors import ConfigError

_SECTION = re.compile(r"[a-z]+\d+(\.\d+)?")


def randaugment(config: str, image_size: int, mean: Sequence[float], dataset: str) -> Callable[[Any], Any]:
    """The RandAugment transform (PIL in, PIL out) timm's ``create_transform`` would build."""
    sections = config.split("-")
    if sections[0] != "rand" or not all(_SECTION.fullmatch(s) for s in sections[1:]):
        raise ConfigError(
            f"dataset '{dataset}': bad randaugment '{config}': expected timm's form 'rand-m9-mstd0.5' "
            "(sections: m<magnitude>, n<ops>, mstd<std>, mmax<max>, w<weights>, inc<0|1>, p<prob>)"
        )
    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in mean)}
    try:
        return rand_augment_transform(config, hparams)
    except (AssertionError, ValueError, KeyError) as error:
        raise ConfigError(f"dataset '{dataset}': bad randaugment '{config}': {error or 'unknown section'}") from None
