"""Distillation losses as pure functions, one module per kind of knowledge.

They follow the conventions of the authors' reference code and are tested against the papers'
formulas in float64.
"""

from kdlab.losses.response import kd_loss

__all__ = ["kd_loss"]
