"""Several frozen teachers: one vectorised forward per architecture, and how their outputs combine.

Same-architecture teachers are stacked (``torch.func.stack_module_state``) and run as one
``vmap``-ed call instead of a Python loop: one kernel launch per layer for all of them. The
combination rules are pure functions so tests can check them against the papers' formulas.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput
from kdlab.schemes.teacher import FrozenTeacher

COMBINE_MODES = ("probs", "logits", "per_teacher")
WEIGHTINGS = ("equal", "fixed", "confidence", "entropy")


def teacher_weights(
    logits: torch.Tensor,
    target: torch.Tensor,
    weighting: str,
    fixed: Sequence[float] = (),
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-sample teacher weights ``[K, B]`` that sum to one over teachers.

    - ``equal``: 1/K;
    - ``fixed``: the given weights, normalised;
    - ``confidence`` (CA-MKD, Zhang et al. ICASSP 2022): ``(1 - softmax_k(CE_k)) / (K - 1)``, so a
      teacher that is wrong on a sample counts less there;
    - ``entropy``: ``softmax_k(-H_k)`` of each teacher's prediction at ``temperature``, so a
      confident teacher counts more on a sample (label-free).
    """
    count, batch = logits.shape[:2]
    if weighting == "equal" or count == 1:
        return logits.new_full((count, batch), 1.0 / count)
    if weighting == "fixed":
        given = torch.as_tensor(list(fixed), dtype=logits.dtype, device=logits.device)
        return (given / given.sum())[:, None].expand(count, batch)
    if weighting == "confidence":
        losses = torch.stack([F.cross_entropy(z, target, reduction="none") for z in logits])
        return (1 - losses.softmax(dim=0)) / (count - 1)
    if weighting == "entropy":
        log_probs = (logits / temperature).log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return (-entropy).softmax(dim=0)
    raise ConfigError(f"unknown weighting '{weighting}' (valid: {', '.join(WEIGHTINGS)})")


def combine_logits(logits: torch.Tensor, weights: torch.Tensor, mode: str, temperature: float = 1.0) -> torch.Tensor:
    """One ``[B, C]`` teacher from ``K`` teachers' ``[K, B, C]`` logits.

    ``probs`` averages the probabilities at ``temperature`` and returns ``T * log(p)``, logits whose
    softmax at that temperature is exactly the weighted mixture (so any response method at the
    same temperature distils the averaged soft labels); ``logits`` averages the logits.
    """
    if mode == "logits":
        return (weights[..., None] * logits).sum(0)
    if mode == "probs":
        mixture = (weights[..., None] * (logits / temperature).softmax(-1)).sum(0)
        return temperature * mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()
    raise ConfigError(f"unknown combine mode '{mode}' (valid: probs, logits)")


class StackedTeachers(nn.Module):
    """Same-architecture teachers as one vectorised forward.

    The stacked weights are non-persistent buffers (they follow the system across devices but
    stay out of its checkpoints); the template module that the weights are swapped into lives on
    the ``meta`` device, outside the module tree.
    """

    def __init__(self, teachers: Sequence[FrozenTeacher], taps: Sequence[str]) -> None:
        super().__init__()
        models = [t.model for t in teachers]
        params, buffers = stack_module_state(models)  # type: ignore[arg-type]
        self._names = {"params": list(params), "buffers": list(buffers)}
        for i, tensor in enumerate([*params.values(), *buffers.values()]):
            self.register_buffer(f"stacked_{i}", tensor.detach(), persistent=False)
        template = copy.deepcopy(models[0]).to("meta").eval()
        self._template = [template]  # a list: not a registered submodule
        self._taps = FeatureTaps(template, taps, role="teacher")
        self.temperatures = [t.temperature for t in teachers]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tensors = [
            getattr(self, f"stacked_{i}") for i in range(len(self._names["params"]) + len(self._names["buffers"]))
        ]
        count = len(self._names["params"])
        return dict(zip(self._names["params"], tensors[:count], strict=True)), dict(
            zip(self._names["buffers"], tensors[count:], strict=True)
        )

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> list[ModelOutput]:
        template = self._template[0]

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor):
            logits = functional_call(template, (params, buffers), (x,))
            return logits, self._taps.collect()

        params, buffers = self._state()
        logits, features = vmap(one, in_dims=(0, 0, None))(params, buffers, inputs)
        outputs = []
        for k, temperature in enumerate(self.temperatures):
            picked = {
                spec: [f[k] for f in value] if isinstance(value, list) else value[k] for spec, value in features.items()
            }
            outputs.append(ModelOutput(logits[k] / temperature if temperature != 1.0 else logits[k], picked))
        return outputs


def _architecture(model: nn.Module) -> tuple[object, ...]:
    """Models with equal classes and parameter/buffer shapes can share one stacked forward."""
    shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items())
    return (type(model), shapes)


class TeacherEnsemble(nn.Module):
    """All teachers' outputs, in their configured order: stacked groups where the architecture
    repeats (``vectorize``), a plain call otherwise."""

    def __init__(self, teachers: Sequence[FrozenTeacher], taps: Sequence[str], vectorize: bool = True) -> None:
        super().__init__()
        self.teachers = list(teachers)  # registered by the scheme already; kept here as references
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, teacher in enumerate(teachers):
            groups.setdefault(_architecture(teacher.model) if vectorize else (index,), []).append(index)
        self.groups = [members for members in groups.values()]
        self.stacked = nn.ModuleDict(
            {
                str(g): StackedTeachers([teachers[i] for i in members], taps)
                for g, members in enumerate(self.groups)
                if len(members) > 1
            }
        )

    def unstack(self) -> None:
        """One plain call per teacher (under sharding: the stacked weights are plain tensors that
        every rank would hold whole, and the teachers' own sharded forward gathers its weights)."""
        self.stacked = nn.ModuleDict()
        self.groups = [[index] for index in range(len(self.teachers))]

    def forward(self, inputs: torch.Tensor) -> list[ModelOutput]:
        outputs: list[ModelOutput | None] = [None] * len(self.teachers)
        for g, members in enumerate(self.groups):
            if str(g) in self.stacked:
                for index, output in zip(members, self.stacked[str(g)](inputs), strict=True):
                    outputs[index] = output
            else:
                outputs[members[0]] = self.teachers[members[0]](inputs)
        return outputs  # type: ignore[return-value]
