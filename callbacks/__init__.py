"""Lightning callbacks kdlab installs as ``kdlab.callbacks`` (see pyproject package-dir)."""

from kdlab.callbacks.seeding import EpochSeed

__all__ = ["EpochSeed"]
