"""Time-frequency images of 1-D signals: the second modality of cross-modal distillation on MNIST-1D.

One function computes the view for a whole batch, on whatever device the signals are on, so the
data module can derive it again from an augmented signal after transfer and both views always show
the same sample.
"""

from __future__ import annotations

import torch

from kdlab.errors import ConfigError

EPS = 1e-6


def spectrogram_shape(signal_length: int, n_fft: int, hop: int) -> tuple[int, int, int]:
    """``(1, F, T)`` of :func:`signal_spectrogram` for one signal (frames of the signal padded by ``n_fft // 2``)."""
    return 1, n_fft // 2 + 1, 1 + (signal_length + 2 * (n_fft // 2) - n_fft) // hop


def check_spectrogram_options(signal_length: int, n_fft: int, hop: int) -> None:
    """Refuse a window longer than the signal or a hop that skips past it, before any data is built."""
    if not 2 <= n_fft <= signal_length:
        raise ConfigError(f"spectrogram_n_fft must be in [2, {signal_length}] (the signal length), got {n_fft}")
    if not 1 <= hop <= signal_length:
        raise ConfigError(f"spectrogram_hop must be in [1, {signal_length}], got {hop}")


def signal_spectrogram(signals: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``[B, L]`` signals -> ``[B, 1, F, T]`` log-magnitude STFT images, each standardised on its own.

    Hann window of ``n_fft`` samples, frames centred with zero padding (zeros, like the shift
    augmentation's fill), ``log1p`` of the magnitude, then zero mean and unit variance per image so
    the student sees the shape of the spectrum, not the signal's loudness.
    """
    window = torch.hann_window(n_fft, device=signals.device, dtype=signals.dtype)
    stft = torch.stft(
        signals, n_fft, hop_length=hop, window=window, center=True, pad_mode="constant", return_complex=True
    )
    image = torch.log1p(stft.abs()).unsqueeze(1)
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    std = image.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (image - mean) / (std + EPS)
