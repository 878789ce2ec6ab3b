"""A deep ensemble (Lakshminarayanan et al., NeurIPS 2017) as one teacher.

N copies of one architecture trained from different seeds are usually better, and better
calibrated, than any one of them. As a teacher the ensemble is a single model whose logits are the
log of the members' averaged probabilities, so every response method, every scheme that takes a
teacher, and each entry of a multi-teacher list can use it unchanged. On a GPU the members run as
one vectorised forward (``vmap`` over stacked weights); on CPU a loop is faster
(bench/multi_teacher.py), so that is the default there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdlab.schemes.ensemble import StackedTeachers, combine_logits
from kdlab.schemes.teacher import FrozenTeacher

# Member m of an ensemble whose teacher seed is s trains from seed s + m * ENSEMBLE_SEED_OFFSET:
# member 0 is the single teacher (its run is shared), and the ensembles of a multi-teacher list
# (teacher seeds s, s+1, ...) never share members.
ENSEMBLE_SEED_OFFSET = 7919


class DeepEnsemble(nn.Module):
    """``log(mean_m softmax(member_m(x)))``: logits whose softmax is the ensemble's prediction.

    ``vectorize``: always (True), never (False), or on accelerators only (None). The vectorised
    forward stacks a copy of the members' weights when it first runs, so build the ensemble from
    trained members.
    """

    def __init__(self, members: Sequence[nn.Module], vectorize: bool | None = None) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.vectorize = vectorize
        self.stacked: StackedTeachers | None = None

    def member_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """``[M, B, C]``: every member's logits."""
        if self.vectorize or (self.vectorize is None and inputs.device.type != "cpu"):
            if self.stacked is None:
                self.stacked = StackedTeachers([FrozenTeacher(member) for member in self.members], ())
            return torch.stack([output.logits for output in self.stacked(inputs)])
        return torch.stack([member(inputs) for member in self.members])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(inputs)
        weights = logits.new_full(logits.shape[:2], 1.0 / len(logits))
        return combine_logits(logits, weights, "probs", temperature=1.0)
