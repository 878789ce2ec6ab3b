"""Quantized distillation's model side: fake-quant grids against their formulas, STE, int8 conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.data.mnist1d import mnist1d_arrays
from kdlab.errors import ConfigError, KdlabError
from kdlab.features import FeatureTaps
from kdlab.models import create_model
from kdlab.quantization import (
    convert_to_int8,
    freeze_batchnorm,
    freeze_observers,
    model_size_bytes,
    prepare_fake_quant,
)

REDUCED_RANGE = torch.backends.quantized.engine in ("x86", "fbgemm")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "weight_fake_quant")]


def fake_quantized(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a quantizer with its current range (eval mode: it does not observe)."""
    quantizer.eval()
    out = quantizer(x)
    quantizer.train()
    return out


def grid_indices(value: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """round(clamp(value)) in float64, and where value sits so close to a rounding tie that float32 may differ."""
    clamped = value.clamp(low, high)
    near_tie = ((clamped - clamped.floor()) - 0.5).abs() < 1e-4
    return torch.round(clamped), near_tie


@pytest.fixture(scope="module")
def mnist1d() -> dict[str, torch.Tensor]:
    return {key: torch.as_tensor(value) for key, value in mnist1d_arrays().items()}


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weights_sit_on_a_symmetric_per_channel_grid(bits: int) -> None:
    torch.manual_seed(0)
    model = prepare_fake_quant(create_model("mnist1d_cnn"), bits, torch.randn(2, 40))
    model(torch.randn(16, 40))  # one train-mode forward: the observers see the weights
    q_max = 2 ** (bits - 1) - 1
    layers = weight_layers(model)
    assert [name for name, _ in layers] == ["layer1.0", "layer2.0", "layer3.0", "fc"]
    for _, layer in layers:
        w = layer.weight.detach().double().flatten(1)
        quantizer = layer.weight_fake_quant
        scale = w.abs().amax(dim=1) / q_max  # symmetric, narrow range, the current weights' range
        torch.testing.assert_close(quantizer.scale.double(), scale, rtol=1e-6, atol=0)
        assert (quantizer.zero_point == 0).all()
        indices, near_tie = grid_indices(w / scale[:, None], -q_max, q_max)
        actual = fake_quantized(quantizer, layer.weight.detach()).double().flatten(1)
        actual_indices = torch.round(actual / scale[:, None])
        assert near_tie.sum() <= 2 and (actual_indices == indices)[~near_tie].all()
        torch.testing.assert_close(actual, actual_indices * scale[:, None], rtol=1e-6, atol=1e-9)
        assert max(len(row.unique()) for row in actual) <= 2**bits - 1
        assert indices.abs().max() == q_max  # each channel's largest weight lands on the grid's end


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_activations_sit_on_an_affine_per_tensor_grid(bits: int) -> None:
    torch.manual_seed(1)
    model = prepare_fake_quant(create_model("mnist1d_mlp"), 8, torch.randn(2, 40), activation_bits=bits)
    x = torch.randn(64, 40) * 3 + 1
    model(x)
    quantizer = model.activation_post_process_0  # the model's input
    q_max = 127 if bits == 8 and REDUCED_RANGE else 2**bits - 1
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (high - low) / q_max
    zero_point = round(-low / scale)
    assert quantizer.scale.item() == pytest.approx(scale, rel=1e-6)
    assert quantizer.zero_point.item() == zero_point
    indices, near_tie = grid_indices(x.double() / scale + zero_point, 0, q_max)
    actual = fake_quantized(quantizer, x).double()
    actual_indices = torch.round(actual / scale) + zero_point
    assert near_tie.sum() <= 2 and (actual_indices == indices)[~near_tie].all()
    assert len(actual.unique()) <= 2**bits


def test_ranges_learn_in_train_mode_only() -> None:
    torch.manual_seed(2)
    model = prepare_fake_quant(create_model("mnist1d_cnn"), 4, torch.randn(2, 40))
    model(torch.randn(32, 40))
    before = {name: b.clone() for name, b in model.named_buffers() if name.endswith("scale")}
    model.eval()(torch.randn(32, 40) * 10)
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers() if name in before)
    model.train()(torch.randn(32, 40) * 10)
    assert not torch.equal(model.activation_post_process_0.scale, before["activation_post_process_0.scale"])
    freeze_observers(model)
    frozen = {name: b.clone() for name, b in model.named_buffers() if name.endswith("scale")}
    model(torch.randn(32, 40) * 100)
    assert all(torch.equal(b, frozen[name]) for name, b in model.named_buffers() if name in frozen)


def test_straight_through_gradients() -> None:
    torch.manual_seed(3)
    model = prepare_fake_quant(create_model("mnist1d_cnn"), 4, torch.randn(2, 40))
    loss = nn.functional.cross_entropy(model(torch.randn(32, 40)), torch.randint(0, 10, (32,)))
    loss.backward()
    for name, layer in weight_layers(model):
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # STE: d/dw sum(g * Q(w)) = g where w is inside the grid, 0 where it is clipped
    quantizer = model.get_submodule("layer2.0").weight_fake_quant.eval()
    w = model.get_submodule("layer2.0").weight.detach().clone()
    w[0, 0, 0] = 10 * w.abs().max()  # outside the learned range: clipped, no gradient
    w.requires_grad_(True)
    g = torch.randn_like(w)
    (quantizer(w) * g).sum().backward()
    expected = g.clone()
    expected[0, 0, 0] = 0
    torch.testing.assert_close(w.grad, expected, rtol=0, atol=0)


def test_training_lowers_the_loss_and_int8_agrees(mnist1d: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(4)
    x, y, x_test = mnist1d["x"], mnist1d["y"], mnist1d["x_test"]
    float_model = create_model("mnist1d_cnn")
    model = prepare_fake_quant(float_model, 8, x[:2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(100):
        batch = torch.arange(step * 128, (step + 1) * 128) % len(x)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])  # measured: 2.22 -> 1.30
    model(x[:512])  # observe the final weights, as the first forward of the next epoch would
    int8 = convert_to_int8(model)

    layers = dict(int8.named_modules())
    assert isinstance(layers["layer1.0"], torch.ao.nn.intrinsic.quantized.ConvReLU1d)
    assert isinstance(layers["fc"], torch.ao.nn.quantized.Linear)
    fake_layers = dict(model.named_modules())
    for name in ("layer1.0", "layer2.0", "layer3.0", "fc"):
        weight = layers[name].weight()
        assert weight.dtype == torch.qint8 and weight.qscheme() == torch.per_channel_affine
        assert (weight.q_per_channel_zero_points() == 0).all() and weight.int_repr().abs().max() == 127
        fake = fake_quantized(fake_layers[name].weight_fake_quant, fake_layers[name].weight.detach())
        torch.testing.assert_close(weight.dequantize(), fake, rtol=0, atol=1e-7)  # the same grid, exactly

    model.eval()
    with torch.no_grad():
        fake_logits, int8_logits = model(x_test), int8(x_test)
    agreement = (fake_logits.argmax(1) == int8_logits.argmax(1)).double().mean().item()
    assert agreement >= 0.95, f"int8 and fake-quant top-1 agree on {agreement:.1%} of the 1000 test samples"
    step = model.activation_post_process_6.scale.item()  # the logits' quantisation step (measured: 0 steps apart)
    assert (fake_logits - int8_logits).abs().max() <= step * 1.001
    assert model.training is False and isinstance(float_model.layer1[0], nn.Conv1d)  # the float model is untouched


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_training_is_finite_and_converts_to_the_b_bit_range(bits: int) -> None:
    torch.manual_seed(5)
    model = prepare_fake_quant(create_model("mnist1d_cnn"), bits, torch.randn(2, 40))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model(torch.randn(64, 40))
    int8 = convert_to_int8(model)
    weight = int8.get_submodule("layer2.0").weight()
    assert weight.dtype == torch.qint8 and weight.int_repr().abs().max() == 2 ** (bits - 1) - 1
    # inputs far outside the learned ranges: only if int8 clips activations to b bits as fake quant does do they agree
    x = torch.randn(256, 40) * 5
    with torch.no_grad():
        fake_logits, int8_logits = model.eval()(x), int8(x)
    step = model.activation_post_process_6.scale.item()
    assert (fake_logits - int8_logits).abs().max() <= step * 1.001
    assert len(int8_logits.unique()) <= 2**bits


@pytest.mark.parametrize(("name", "shape"), [("mnist1d_mlp", (40,)), ("resnet8x4", (3, 32, 32))])
def test_other_students_prepare_and_convert(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(6)
    model = prepare_fake_quant(create_model(name, num_classes=10), 8, torch.randn(2, *shape))
    x = torch.randn(8, *shape)
    model(x).sum().backward()
    int8 = convert_to_int8(model)
    quantized = [m for m in int8.modules() if hasattr(m, "weight") and callable(m.weight)]
    assert quantized and all(m.weight().dtype == torch.qint8 for m in quantized)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())  # folded into the int8 convs
    with torch.no_grad():
        assert int8(x).shape == (8, 10) == model.eval()(x).shape


def test_int8_size_against_float() -> None:
    torch.manual_seed(7)
    float_model = create_model("resnet8x4", num_classes=100)
    model = prepare_fake_quant(float_model, 8, torch.randn(2, 3, 32, 32))
    model(torch.randn(4, 3, 32, 32))
    float_size, int8_size = model_size_bytes(float_model), model_size_bytes(convert_to_int8(model))
    parameters = sum(p.numel() for p in float_model.parameters())
    assert 4 * parameters < float_size < 4.1 * parameters  # float32 payload plus torch.save's overhead
    assert int8_size < 0.35 * float_size, f"int8 / float size = {int8_size / float_size:.3f}"  # measured: 0.258


def test_int8_resnet_folds_batchnorm_and_agrees() -> None:
    torch.manual_seed(8)
    x = torch.randn(64, 3, 32, 32)
    model = prepare_fake_quant(create_model("resnet8x4", num_classes=10), 8, x[:2])
    stem = model.stem.conv  # conv + BN + ReLU, fused
    assert isinstance(stem, torch.ao.nn.intrinsic.qat.ConvBnReLU2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for batch in x.split(16):
        model(batch).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    running_mean = stem.bn.running_mean.clone()
    freeze_batchnorm(model)
    model(x[:16])  # observes the last weights with the statistics the fold will use
    assert torch.equal(stem.bn.running_mean, running_mean)
    int8 = convert_to_int8(model)
    assert isinstance(int8.stem.conv, torch.ao.nn.intrinsic.quantized.ConvReLU2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())
    with torch.no_grad():
        fake_logits, int8_logits = model.eval()(x), int8(x)
    agreement = (fake_logits.argmax(1) == int8_logits.argmax(1)).double().mean().item()
    assert agreement >= 0.95, f"top-1 agreement {agreement:.1%}"  # measured: 63/64 on random inputs and labels


def test_quantized_students_have_no_feature_taps() -> None:
    model = prepare_fake_quant(create_model("resnet8x4", num_classes=10), 8, torch.randn(2, 3, 32, 32))
    with pytest.raises(KdlabError, match="has no embedding layer"):
        FeatureTaps(model, ("embedding",), role="student")


@pytest.mark.parametrize("bits", [1, 9, 16, 4.0, "8", True])
def test_bad_bit_widths_are_config_errors(bits: object) -> None:
    with pytest.raises(ConfigError, match=rf"bits must be one of 2, 3, 4, 5, 6, 7, 8 .*got {bits!r}"):
        prepare_fake_quant(create_model("mnist1d_mlp"), bits, torch.randn(2, 40))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="activation_bits must be one of"):
        prepare_fake_quant(create_model("mnist1d_mlp"), 8, torch.randn(2, 40), activation_bits=bits)  # type: ignore[arg-type]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        prepare_fake_quant(DataDependent(), 8, torch.randn(2, 40))
    message = str(error.value)
    assert message.startswith("cannot quantize DataDependent: torch.fx cannot trace it")
    assert "symbolically traced variables cannot be used as inputs to control flow" in message
    assert "\n" not in message


def test_converting_an_unobserved_model_is_an_error() -> None:
    model = prepare_fake_quant(create_model("mnist1d_mlp"), 8, torch.randn(2, 40))
    with pytest.raises(KdlabError, match="has not run in train mode yet"):
        convert_to_int8(model)
    with pytest.raises(KdlabError, match="no fake quantizers"):
        convert_to_int8(create_model("mnist1d_mlp"))


def test_state_dict_restores_a_fresh_preparation() -> None:
    """Resuming from a checkpoint: prepare the float model again, load the fake-quant state dict."""
    torch.manual_seed(9)
    trained = prepare_fake_quant(create_model("mnist1d_cnn"), 4, torch.randn(2, 40))
    x = torch.randn(32, 40)
    trained(x)
    trained(2 * x)
    resumed = prepare_fake_quant(create_model("mnist1d_cnn"), 4, torch.randn(2, 40))
    resumed.load_state_dict(trained.state_dict())
    assert torch.equal(resumed.activation_post_process_0.scale, trained.activation_post_process_0.scale)
    with torch.no_grad():
        assert torch.equal(resumed.eval()(x), trained.eval()(x))
        assert torch.equal(convert_to_int8(resumed)(x), convert_to_int8(trained)(x))
