"""Online distillation, Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, CVPR 2018).

Two or more peers of the student's architecture train together from different initialisations;
each learns from the labels and from every other peer through the configured method (DML: KL at
T=1, weight 1, i.e. ``method.name=kd``, ``temperature=1``, ``weights {ce: 1, kd: 1}``). Peer
``i``'s term against peer ``j`` treats ``j`` as a fixed target (detached), so one optimiser step
equals every peer taking its own step, as in the paper's simultaneous variant. The student is peer
0; every peer's accuracy is reported (``val/peer1/top1``, ...).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kdlab.data.base import Batch
from kdlab.errors import ConfigError
from kdlab.features import FeatureTaps, ModelOutput, tapped_forward
from kdlab.schemes.base import DistillationScheme, SystemParts, probing
from kdlab.schemes.registry import register_scheme


@dataclass
class MutualOptions:
    peers: int = 2  # the student and peers - 1 more of its architecture


def _detached(output: ModelOutput) -> ModelOutput:
    features = {k: [f.detach() for f in v] if isinstance(v, list) else v.detach() for k, v in output.features.items()}
    return ModelOutput(output.logits.detach(), features)


@register_scheme("dml", "online: peers learn from the labels and from each other (Deep Mutual Learning)")
class DeepMutualLearning(DistillationScheme):
    example = "mnist1d-dml"
    Options = MutualOptions
    teachers_taken = "none"

    def __init__(self, parts: SystemParts) -> None:
        super().__init__(parts)
        count = self.options.peers
        if count < 2:
            raise ConfigError(f"dml: peers must be at least 2, got {count}")
        if parts.method.init_epochs:
            raise ConfigError(f"dml: method '{parts.method.name}' has an initialisation stage; not supported")
        assert parts.make_student is not None and parts.make_method is not None and parts.example is not None
        self.peers = nn.ModuleList([parts.make_student(k) for k in range(1, count)])
        taps = tuple(dict.fromkeys(parts.method.student_taps + parts.method.teacher_taps))
        self.student_taps.remove()
        self._taps = [FeatureTaps(model, taps, role=f"peer {k}") for k, model in enumerate(self.models())]
        self.pairs = list(itertools.permutations(range(count), 2))
        with probing(*self.models()):
            outputs = self._outputs(parts.example)
        methods = []
        for i, j in self.pairs:
            method = parts.method if (i, j) == (0, 1) else parts.make_method()
            if (i, j) != (0, 1):
                method.setup(outputs[i], outputs[j], parts.data_info)  # type: ignore[arg-type]
            methods.append(method)
        self.pair_methods = nn.ModuleList(methods[1:])  # the first is self.method, already registered
        self._methods = methods

    def models(self) -> list[nn.Module]:
        return [self.student, *self.peers]

    def _outputs(self, batch: Batch) -> list[ModelOutput]:
        x = batch[self.input_key]  # type: ignore[literal-required]
        return [tapped_forward(model, taps, x) for model, taps in zip(self.models(), self._taps, strict=True)]

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        outputs = self._outputs(batch)
        others = len(outputs) - 1
        terms: dict[str, torch.Tensor] = {}
        if self.weights.get("ce", 0.0):
            for k, output in enumerate(outputs):
                ce = self.supervised_ce(output.logits, batch)
                self.diagnostics[f"peer{k}_ce"] = ce.detach()
                terms["ce"] = terms["ce"] + ce if "ce" in terms else ce
        for (i, j), method in zip(self.pairs, self._methods, strict=True):
            for name, value in method(outputs[i], _detached(outputs[j]), batch).items():
                value = value / others
                terms[name] = terms[name] + value if name in terms else value
        return terms

    def eval_logits(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch[self.input_key]  # type: ignore[literal-required]
        return {"" if k == 0 else f"peer{k}": model(x) for k, model in enumerate(self.models())}

    def scheme_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.peers.parameters()
        yield from self.pair_methods.parameters()
