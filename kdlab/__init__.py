"""kdlab: knowledge distillation, from calibrated teachers to students that run on the device."""

__version__ = "0.1.0"
