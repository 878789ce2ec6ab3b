"""Every registered model builds (kdlab and timm), runs forward/backward, and has its reference size.

Parametrised over the registry itself, so a newly registered model is tested automatically, and a
model without a reference parameter count fails until its count is added to the tables below.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

from kdlab.models import MODELS, count_parameters, create_model

# Parameter counts from running HobbitLong/RepDistiller's models (models/__init__.py model_dict, at
# commit b84f547) with num_classes=100 and 10. kdlab name -> {num_classes: parameters}.
CIFAR_REFERENCE: dict[str, dict[int, int]] = {
    "resnet8": {100: 83_892, 10: 78_042},
    "resnet14": {100: 181_108, 10: 175_258},
    "resnet20": {100: 278_324, 10: 272_474},
    "resnet32": {100: 472_756, 10: 466_906},
    "resnet44": {100: 667_188, 10: 661_338},
    "resnet56": {100: 861_620, 10: 855_770},
    "resnet110": {100: 1_736_564, 10: 1_730_714},
    "resnet8x4": {100: 1_233_540, 10: 1_210_410},
    "resnet32x4": {100: 7_433_860, 10: 7_410_730},
    "resnet50": {100: 23_705_252, 10: 23_520_842},  # RepDistiller's ResNet50
    "wrn_16_1": {100: 180_916, 10: 175_066},
    "wrn_16_2": {100: 703_284, 10: 691_674},
    "wrn_40_1": {100: 569_780, 10: 563_930},
    "wrn_40_2": {100: 2_255_156, 10: 2_243_546},
    "vgg8": {100: 3_965_028, 10: 3_918_858},
    "vgg11": {100: 9_277_284, 10: 9_231_114},
    "vgg13": {100: 9_462_180, 10: 9_416_010},
    "vgg16": {100: 14_774_436, 10: 14_728_266},
    "vgg19": {100: 20_086_692, 10: 20_040_522},
    "mobilenetv2": {100: 812_836, 10: 697_546},  # RepDistiller's mobile_half (MobileNetV2)
    "shufflenetv1": {100: 949_258, 10: 862_768},  # RepDistiller's ShuffleV1
    "shufflenetv2": {100: 1_355_528, 10: 1_263_278},  # RepDistiller's ShuffleV2
}


def mnist1d_reference(num_classes: int) -> dict[str, int]:
    """Parameter counts from the MNIST-1D paper's layer sizes (Greydanus & Kobak), for any class count."""
    length, hidden, channels, gru = 40, 100, 25, 6
    conv_length = 5  # 40 -> 19 -> 10 -> 5 samples after the convs (kernel 5, 3, 3; stride 2; padding 1)
    return {
        "mnist1d_linear": (length + 1) * num_classes,
        "mnist1d_mlp": (length + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes,
        "mnist1d_cnn": (5 + 1) * channels
        + 2 * (3 * channels + 1) * channels
        + (conv_length * channels + 1) * num_classes,
        # two directions x three gates x (input weights, recurrent weights, two biases)
        "mnist1d_gru": 2 * 3 * (gru + gru * gru + 2 * gru) + (2 * gru * length + 1) * num_classes,
    }


def spectrogram_reference(num_classes: int) -> dict[str, int]:
    """Three 3x3 conv-BN stages (16 channels, convs without bias) and a linear read-out of the pooled channels."""
    channels = 16
    conv_bn = (9 * 1 + 2) * channels + 2 * (9 * channels + 2) * channels
    return {"mnist1d_spectrogram_cnn": conv_bn + (channels + 1) * num_classes}


def reference_count(name: str, num_classes: int) -> int:
    if name in CIFAR_REFERENCE:
        return CIFAR_REFERENCE[name][num_classes]
    return {**mnist1d_reference(num_classes), **spectrogram_reference(num_classes)}[name]


ALL_MODELS = MODELS.names()
IMAGE_MODELS = [name for name in ALL_MODELS if MODELS.entry(name).meta["input"] == "image"]


def make_input(name: str, batch: int = 2) -> torch.Tensor:
    kind = MODELS.entry(name).meta["input"]
    if kind == "image":
        return torch.randn(batch, 3, 32, 32)
    if kind == "signal":
        return torch.randn(batch, 40)
    if kind == "spectrogram":
        return torch.randn(batch, 1, 9, 21)  # paired_mnist1d's default student view
    raise AssertionError(f"model '{name}' has input kind '{kind}' that this test cannot feed")


def default_num_classes(name: str) -> int:
    return inspect.signature(MODELS.get(name)).parameters["num_classes"].default


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Build without allocating or initialising weights: enough for sizes and structure, and fast."""
    with torch.device("meta"):
        return build()


def test_every_registered_model_has_a_reference_count() -> None:
    known = set(CIFAR_REFERENCE) | set(mnist1d_reference(10)) | set(spectrogram_reference(10))
    missing = sorted(set(ALL_MODELS) - known)
    assert not missing, f"add reference parameter counts for: {', '.join(missing)}"


def test_every_reference_count_belongs_to_a_registered_model() -> None:
    known = set(CIFAR_REFERENCE) | set(mnist1d_reference(10)) | set(spectrogram_reference(10))
    stale = sorted(known - set(ALL_MODELS))
    assert not stale, f"reference counts for unregistered models: {', '.join(stale)}"


def test_mnist1d_formula_gives_the_paper_sizes() -> None:
    assert mnist1d_reference(10) == {
        "mnist1d_linear": 410,
        "mnist1d_mlp": 15_210,
        "mnist1d_cnn": 5_210,
        "mnist1d_gru": 5_134,
    }


@pytest.mark.parametrize("num_classes", [100, 10])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_parameter_count_matches_reference(name: str, num_classes: int) -> None:
    model = build_on_meta(lambda: create_model(name, num_classes=num_classes))
    assert count_parameters(model) == reference_count(name, num_classes)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    logits = model(make_input(name))
    assert logits.shape == (2, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_timm_builds_the_same_model(name: str) -> None:
    model = timm.create_model(MODELS.entry(name).meta["timm_name"])
    reference = build_on_meta(lambda: create_model(name))
    num_classes = default_num_classes(name)
    assert type(model) is type(reference)
    assert count_parameters(model) == reference_count(name, num_classes)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    assert shapes == {key: value.shape for key, value in reference.state_dict().items()}
    with torch.no_grad():
        assert model(make_input(name)).shape == (2, num_classes)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_taps_are_modules_hooked_in_order(name: str) -> None:
    model = create_model(name, num_classes=10)
    modules = dict(model.named_modules())
    taps = model.feature_taps
    assert taps and all(tap in modules for tap in taps), f"{name}: taps {taps} not all modules"
    seen: list[str] = []
    outputs: dict[str, torch.Tensor] = {}

    def hook(tap: str) -> Callable[..., None]:
        def record(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen.append(tap)
            outputs[tap] = output

        return record

    for tap in taps:
        modules[tap].register_forward_hook(hook(tap))
    with torch.no_grad():
        model(make_input(name))
    assert seen == list(taps), f"{name}: taps fire in order {seen}, listed as {taps}"
    if MODELS.entry(name).meta["input"] == "image":
        assert {"layer1", "layer2", "layer3"} <= set(taps) and taps[-1] == "pool"
        assert isinstance(model.fc, nn.Linear)
        assert not list(model.pool.parameters())
        assert outputs["pool"].shape == (2, model.fc.in_features)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_out_act_is_a_separate_non_inplace_relu(name: str) -> None:
    for module_name, module in build_on_meta(lambda: create_model(name)).named_modules():
        if module_name.split(".")[-1] == "out_act":
            assert isinstance(module, nn.ReLU) and not module.inplace, f"{name}: {module_name}"


def test_out_act_hook_sees_the_pre_activation() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8x4")
    captured: dict[str, torch.Tensor] = {}
    model.layer3[-1].out_act.register_forward_hook(
        lambda _module, inputs, output: captured.update(pre=inputs[0], post=output)
    )
    model.layer3.register_forward_hook(lambda _module, _inputs, output: captured.update(stage=output))
    with torch.no_grad():
        model(make_input("resnet8x4"))
    assert captured["pre"].min() < 0
    assert torch.equal(captured["post"], captured["pre"].clamp(min=0))
    assert torch.equal(captured["stage"], captured["post"])


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("wrn_16_1", {"drop_rate": 0.3}),
        ("mobilenetv2", {"expand_ratio": 4, "width_mult": 1.0}),
        ("shufflenetv2", {"width": 0.5}),
    ],
)
def test_architecture_options(name: str, options: dict[str, float]) -> None:
    model = create_model(name, num_classes=10, **options)
    assert repr(model) != repr(create_model(name, num_classes=10)), f"{name}: {options} changed nothing"
    with torch.no_grad():
        assert model(make_input(name)).shape == (2, 10)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_description_states_the_100_class_size(name: str) -> None:
    match = re.search(r"\((\d+\.\d\d)M\)", MODELS.entry(name).description)
    assert match, f"{name}: description lacks its size, e.g. '(0.28M)'"
    assert float(match.group(1)) == round(reference_count(name, 100) / 1e6, 2)


def test_any_timm_model_works_by_its_timm_name() -> None:
    model = create_model("resnet10t", num_classes=7).eval()
    assert type(model).__module__.startswith("timm.")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
