"""1-D signal augmentation: shifts with zero fill, bounded gain, noise; only on training batches."""

from __future__ import annotations

import lightning as L
import torch

from kdlab.config import DataConfig
from kdlab.data import create_datamodule
from kdlab.data.signal_augment import SignalAugment


def _shifted(signal: torch.Tensor, shift: int) -> torch.Tensor:
    """``signal`` delayed by ``shift`` samples (advanced if negative), zeros where nothing was."""
    out = torch.zeros_like(signal)
    if shift >= 0:
        out[shift:] = signal[: len(signal) - shift]
    else:
        out[:shift] = signal[-shift:]
    return out


def test_pure_shift_moves_the_signal_and_fills_zeros() -> None:
    signal = torch.arange(1.0, 41.0)
    torch.manual_seed(0)
    rows = SignalAugment(max_shift=3, scale=0.0, noise_std=0.0)(signal.repeat(64, 1))
    candidates = {k: _shifted(signal, k) for k in range(-3, 4)}
    seen = set()
    for row in rows:
        matches = [k for k, candidate in candidates.items() if torch.equal(row, candidate)]
        assert len(matches) == 1, row
        seen.add(matches[0])
    assert seen == set(range(-3, 4))  # every shift in range occurs in 64 draws


def test_gain_and_noise_are_bounded_and_random() -> None:
    signal = torch.ones(1000, 40)
    torch.manual_seed(1)
    scaled = SignalAugment(max_shift=0, scale=0.2, noise_std=0.0)(signal)
    gains = scaled[:, 0]
    assert gains.min() >= 0.8 and gains.max() <= 1.2 and gains.std() > 0.05
    assert torch.allclose(scaled, gains[:, None].expand_as(scaled))  # one gain per signal
    noisy = SignalAugment(max_shift=0, scale=0.0, noise_std=0.1)(signal)
    assert abs((noisy - 1).std().item() - 0.1) < 0.005


def test_same_seed_same_augmentation() -> None:
    signal = torch.randn(8, 40)
    augment = SignalAugment()
    torch.manual_seed(3)
    first = augment(signal)
    torch.manual_seed(3)
    assert torch.equal(first, augment(signal))


def test_the_data_module_augments_training_batches_only() -> None:
    batch = {"input": torch.randn(4, 40), "target": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    for augment, stage, changed in ((True, "training", True), (True, "validating", False), (False, "training", False)):
        module = create_datamodule(DataConfig(name="mnist1d", augment=augment))
        module.trainer = trainer
        setattr(trainer, stage, True)
        out = module.on_after_batch_transfer(dict(batch), 0)
        assert (not torch.equal(out["input"], batch["input"])) is changed, (augment, stage)
        assert torch.equal(out["target"], batch["target"])
