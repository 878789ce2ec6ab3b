"""Per-epoch reseeding, so a resumed run draws exactly the same shuffles and augmentations."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class EpochSeed(Callback):
    """Reseed every RNG at the start of each training epoch from ``(seed, epoch)``.

    Lightning restores weights, optimiser and schedule on resume but not the global random
    streams; making each epoch's randomness a function of the epoch alone makes a killed-and-resumed
    run finish with the same metrics as an uninterrupted one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # modulo numpy's seed range: large seeds (an LM teacher's offset one) wrap; small ones are unchanged
        L.seed_everything((self.seed * 100_003 + trainer.current_epoch) % 2**32, workers=True, verbose=False)
