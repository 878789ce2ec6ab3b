"""Lightning callbacks kdlab installs as ``kdlab.callbacks`` (see pyproject package-dir).

Importing the package registers every named callback (``CALLBACKS``), as ``kdlab.methods`` does
for methods.
"""

from kdlab.callbacks.best_epoch import BestEpochTest
from kdlab.callbacks.checkpoint import AtomicCheckpoint
from kdlab.callbacks.registry import CALLBACKS, create_callback, register_callback
from kdlab.callbacks.seeding import EpochSeed
from kdlab.callbacks.temperature import CurriculumTemperature, GlobalTemperature, TemperatureSchedule

__all__ = [
    "CALLBACKS",
    "AtomicCheckpoint",
    "BestEpochTest",
    "CurriculumTemperature",
    "EpochSeed",
    "GlobalTemperature",
    "TemperatureSchedule",
    "create_callback",
    "register_callback",
]
