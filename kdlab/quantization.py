"""Quantisation-aware training for quantized distillation (Polino, Pascanu & Alistarh, ICLR 2018).

The student trains with *fake quantisation*: every forward rounds weights and activations to a
``b``-bit grid and back to float, and the backward pass treats the rounding as the identity inside
the grid (the straight-through estimator), so the float "shadow" weights keep learning while the
loss sees the quantized network. Afterwards :func:`convert_to_int8` turns it into a real int8
model that runs int8 kernels on CPU. Everything is PyTorch's FX graph mode machinery
(``prepare_qat_fx`` / ``convert_fx``); this module only picks the quantizers:

- weights: symmetric, per output channel, narrow range ``-(2**(b-1) - 1) .. 2**(b-1) - 1``
  (``2**b - 1`` levels; at 2 bits the ternary ``{-s, 0, s}``). Narrow, because a symmetric scale
  ``max|w| / (2**(b-1) - 1)`` maps the channel's largest weight exactly onto the grid; the extra
  level ``-2**(b-1)`` could only be used by clipping the positive side. The range is that of the
  *current* weights (moving average with constant 1): weights are known exactly at every step,
  so there is nothing to estimate;
- activations: affine, per tensor, ``0 .. 2**a - 1`` with ``a = activation_bits``, the range a
  moving average (torch's default constant 0.01) of each training batch's min and max. On the
  x86/fbgemm engines 8-bit activations use ``0 .. 127``, torch's ``reduce_range`` for those
  engines: their u8 x s8 kernels add pairs of products in int16, which saturates over the full
  range on CPUs without VNNI; at 2-7 bits the range is already below 128. Every activation is
  quantized, the model's input and its logits included: at ``activation_bits=2`` the logits take
  4 values, so low-bit weights usually pair with ``activation_bits=8``;
- observers update ranges **in train mode only** (torch's own update in eval mode too), so
  validation and test batches never move the ranges.

Consequences the scheme must know:

- **BatchNorm** after a conv is fused into it (``ConvBn*d``/``ConvBnReLU*d``): training simulates
  the fold (the weight is scaled by ``gamma / sigma`` before it is fake-quantized, BN statistics
  still update), and :func:`convert_to_int8` folds BN into the int8 conv. Conv + ReLU and
  Linear + ReLU fuse as well. :func:`freeze_batchnorm` and :func:`freeze_observers` are torch's
  QAT recipe for the last epochs: the network then fine-tunes against the exact BN statistics and
  quantisation grid the int8 model will use.
- **Feature taps do not survive.** The prepared model is a ``torch.fx.GraphModule``: it has no
  ``feature_taps``, containers (stages, ``nn.Sequential``) are inlined so their hooks never fire,
  and fused modules replace conv/BN/ReLU. Quantized students therefore distil through their
  logits only (response-based methods: ``ce``, ``kd``, ``dkd``, ``dist``, ``ls_kd``); a spec tap
  such as ``embedding`` or ``stages`` fails with kdlab's usual "has no ... layer" error.
- Values of ``b < 8`` bits live in int8 (weights) and uint8 (activations) containers restricted to
  the ``b``-bit range (activations by clamps :func:`convert_to_int8` adds, since the kernels
  saturate at 255 only): the int8 model computes the fake-quant model's ``b``-bit network, but its
  file and kernels are int8-sized; packing several values per byte would need custom kernels.
- ``torch.ao.quantization`` announces its own deprecation in favour of torchao's pt2e API (not a
  kdlab dependency); it works in torch 2.14, so its warnings are filtered here by message only.
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_observer,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from kdlab.errors import ConfigError, KdlabError

VALID_BITS = (2, 3, 4, 5, 6, 7, 8)
# Engines whose int8 kernels can saturate with full-range uint8 activations (see the module docstring).
_REDUCED_RANGE_ENGINES = ("x86", "fbgemm")


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence torch.ao.quantization's self-deprecation (and its quantized-tensor one), nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        yield


class TrainOnlyFakeQuantize(FakeQuantize):
    """torch's observe + fake-quantize, whose observer updates the range in train mode only.

    Torch's version also observes in eval mode, so every validation batch would shift the ranges
    towards held-out data (and the int8 model would depend on how often validation ran). Not the
    fused ``FusedMovingAvgObsFakeQuantize``: its kernel computes narrow-range scales differently
    from the observer's ``calculate_qparams``, which is what ``convert_fx`` uses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        if not self.fake_quant_enabled[0]:
            return x
        q_min, q_max = self.activation_post_process.quant_min, self.activation_post_process.quant_max
        if self.is_per_channel:
            return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.ch_axis, q_min, q_max)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, q_min, q_max)


def _check_bits(name: str, bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        valid = ", ".join(map(str, VALID_BITS))
        raise ConfigError(f"{name} must be one of {valid} (quantized int8 kernels hold at most 8 bits), got {bits!r}")
    return bits


def qconfig_for(bits: int, activation_bits: int | None = None, engine: str | None = None) -> QConfig:
    """The weight and activation fake quantizers for ``bits``-bit weights and activations.

    ``engine`` defaults to ``torch.backends.quantized.engine``, the one that runs the int8 model.
    """
    bits = _check_bits("bits", bits)
    activation_bits = _check_bits("activation_bits", bits if activation_bits is None else activation_bits)
    engine = engine or torch.backends.quantized.engine
    activation_max = 2**activation_bits - 1
    if engine in _REDUCED_RANGE_ENGINES:
        activation_max = min(activation_max, 127)
    weight_max = 2 ** (bits - 1) - 1
    activation = TrainOnlyFakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=activation_max,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = TrainOnlyFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=1.0,
        quant_min=-weight_max,
        quant_max=weight_max,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    )
    return QConfig(activation=activation, weight=weight)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def prepare_fake_quant(
    model: nn.Module, bits: int, example_input: torch.Tensor, activation_bits: int | None = None
) -> nn.Module:
    """A copy of ``model`` that trains with ``bits``-bit fake-quantized weights and activations.

    The copy is a ``torch.fx.GraphModule`` in train mode (the original is left untouched); its
    observers learn the ranges during training, gradients pass by the straight-through estimator.
    """
    qconfig = qconfig_for(bits, activation_bits)
    student = copy.deepcopy(model).train()
    try:
        torch.fx.Tracer().trace(student)
    except Exception as error:  # user forward code may raise anything while traced
        raise ConfigError(
            f"cannot quantize {type(model).__name__}: torch.fx cannot trace it ({_first_line(error)}); "
            "quantized distillation needs a model without data-dependent control flow"
        ) from error
    with _quiet_deprecations():
        return prepare_qat_fx(student, QConfigMapping().set_global(qconfig), example_inputs=(example_input,))


def _fake_quantizers(model: nn.Module) -> list[tuple[str, TrainOnlyFakeQuantize]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, TrainOnlyFakeQuantize)]


def convert_to_int8(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The real int8 model of a trained :func:`prepare_fake_quant` model, in eval mode on CPU.

    Conv and linear layers become ``torch.ao.nn.quantized`` modules with qint8 per-channel weights
    (BatchNorm folded in) and int32 biases in the kernel; activations between them are quint8.
    Below 8 bits the values occupy int8/uint8 containers restricted to the b-bit grid: weights by
    construction, activations by a quantized clamp after every op that creates them (the kernels
    themselves saturate at 255 only), so the int8 model computes the network the fake-quant model
    computes in eval mode. The fake-quant model is not modified.

    ``state_dict``: a saved int8 model's state (weights, scales, zero points), loaded before the
    clamps are derived from the scales; this rebuilds a saved int8 model from its architecture.
    """
    quantizers = _fake_quantizers(model)
    if not quantizers:
        raise KdlabError(f"{type(model).__name__} has no fake quantizers; prepare it with prepare_fake_quant first")
    unseen = [name for name, q in quantizers if not torch.isfinite(q.activation_post_process.min_val).all()]
    if unseen:
        raise KdlabError(
            f"the fake-quant model has not run in train mode yet, so {len(unseen)} quantizer ranges are unknown"
            f" (first: {unseen[0]}); train it before convert_to_int8"
        )
    activation_max = max(q.quant_max for _, q in quantizers if q.dtype == torch.quint8)
    with _quiet_deprecations():
        int8_model = convert_fx(copy.deepcopy(model).cpu().eval())
        if state_dict is not None:
            int8_model.load_state_dict(state_dict)
    if activation_max < 255:
        _clip_activations(int8_model, activation_max)
    return int8_model


def _attribute(module: nn.Module, value: object) -> object:
    """A graph argument's value: a constant, or the module attribute a ``get_attr`` node reads."""
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return functools.reduce(getattr, str(value.target).split("."), module)
    return value


def _created_qparams(module: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[float, int] | None:
    """Scale and zero point of a node that creates new quint8 values (quantize, conv, add, ...), else None.

    Ops that only move or average values (reshape, pooling, ReLU) keep their input's qparams and range.
    """
    if node.op == "call_module":
        layer = module.get_submodule(str(node.target))
        creates = type(layer).__module__.startswith("torch.ao.nn") and hasattr(layer, "zero_point")
        return (float(layer.scale), int(layer.zero_point)) if creates else None
    if node.op != "call_function":
        return None
    if node.target is torch.quantize_per_tensor:
        names = ["input", "scale", "zero_point", "dtype"]
    elif isinstance(node.target, torch._ops.OpOverloadPacket) and node.target._qualified_op_name.startswith(
        "quantized::"
    ):
        names = [argument.name for argument in node.target.default._schema.arguments]
    else:
        return None
    arguments = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if arguments.get("scale") is None or arguments.get("dtype", torch.quint8) != torch.quint8:
        return None
    return float(_attribute(module, arguments["scale"])), int(_attribute(module, arguments["zero_point"]))


def _clip_activations(module: torch.fx.GraphModule, activation_max: int) -> None:
    """Clamp every newly created quint8 activation to ``0 .. activation_max``, as fake quantisation does."""
    graph = module.graph
    for node in list(graph.nodes):
        qparams = _created_qparams(module, node)
        if qparams is None:
            continue
        scale, zero_point = qparams
        with graph.inserting_after(node):
            clipped = graph.call_function(torch.clamp, (node,), {"max": (activation_max - zero_point) * scale})
        node.replace_all_uses_with(clipped, delete_user_cb=lambda user, clipped=clipped: user is not clipped)
    graph.lint()
    module.recompile()


def freeze_observers(model: nn.Module) -> nn.Module:
    """Fix every quantizer's range; fake quantisation continues with the last ranges.

    For the last epochs: the weights then adapt to the exact grid the int8 model will use, and the
    fake-quant model in eval mode computes what the int8 model computes.
    """
    return model.apply(disable_observer)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Train fused conv+BN layers on their running statistics, as the folded int8 conv will use them.

    Torch's recipe freezes BN a little before the observers; a no-op for models without BN.
    """
    return model.apply(freeze_bn_stats)


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a float or int8 model costs on disk.

    Includes torch's per-tensor serialisation overhead (a few hundred bytes per entry), which
    dominates for models of a few thousand parameters.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
