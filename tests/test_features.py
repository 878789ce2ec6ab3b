"""Feature taps: named layers through forward hooks, clear errors for layers that do not exist."""

from __future__ import annotations

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.features import FeatureTaps, tapped_forward
from kdlab.models import create_model


def test_taps_return_the_named_layer_outputs() -> None:
    model = create_model("mnist1d_cnn").eval()
    taps = FeatureTaps(model, ("layer1", "layer3", "flatten"))
    x = torch.randn(3, 40)
    out = tapped_forward(model, taps, x)
    with pytest.raises(KdlabError, match="did not run"):  # collected features are handed over, not kept
        taps.collect()
    assert out.features["layer3"].shape == (3, 25, 5)
    assert out.features["flatten"].shape == (3, 125)
    torch.testing.assert_close(out.features["layer1"], model.layer1(x.reshape(3, 1, 40)))
    torch.testing.assert_close(out.logits, model(x))


def test_input_taps_see_the_pre_activation() -> None:
    model = create_model("resnet8x4", num_classes=10).eval()
    taps = FeatureTaps(model, ("layer3.0.out_act:input", "layer3"))
    out = tapped_forward(model, taps, torch.randn(2, 3, 32, 32))
    pre, post = out.features["layer3.0.out_act:input"], out.features["layer3"]
    assert pre.min() < 0
    torch.testing.assert_close(post, pre.clamp(min=0))


def test_unknown_layer_lists_the_model_layers() -> None:
    model = create_model("mnist1d_cnn")
    with pytest.raises(KdlabError) as error:
        FeatureTaps(model, ("layer4",), role="student")
    message = str(error.value)
    assert "student (MNIST1DCNN) has no layer 'layer4'" in message
    assert "layer1, layer2, layer3, flatten" in message and "did you mean" in message


def test_removed_taps_stop_collecting() -> None:
    model = create_model("mnist1d_mlp")
    taps = FeatureTaps(model, ("layer1",))
    taps.remove()
    model(torch.randn(1, 40))
    with pytest.raises(KdlabError, match="did not run"):
        taps.collect()


def test_tap_specs_mean_the_same_on_every_architecture() -> None:
    model = create_model("resnet8x4", num_classes=10).eval()
    specs = ("embedding", "stages", "stage:-1", "stage:1", "stem+stages", "preacts", "preact:0")
    out = tapped_forward(model, FeatureTaps(model, specs), torch.randn(2, 3, 32, 32))
    features = out.features
    assert features["embedding"].shape == (2, 256)
    assert [f.shape[1] for f in features["stages"]] == [64, 128, 256]
    assert features["stage:-1"] is features["stages"][-1] and features["stage:1"] is features["stages"][1]
    assert len(features["stem+stages"]) == 4 and features["stem+stages"][0].shape[1] == 32
    for pre, post in zip(features["preacts"], features["stages"], strict=True):
        torch.testing.assert_close(post, pre.clamp(min=0))
    torch.testing.assert_close(features["preact:0"], features["preacts"][0])
    mlp = create_model("mnist1d_mlp")
    out = tapped_forward(mlp, FeatureTaps(mlp, ("embedding", "stages", "preacts")), torch.randn(2, 40))
    assert out.features["embedding"].shape == (2, 100) and len(out.features["stages"]) == 1


def test_specs_a_model_cannot_provide_fail_clearly() -> None:
    with pytest.raises(KdlabError, match="has 3 stages; tap 'stage:3' is out of range"):
        FeatureTaps(create_model("mnist1d_cnn"), ("stage:3",))
    timm_model = create_model("resnet10t", num_classes=10)
    with pytest.raises(KdlabError, match=r"has no pre-activation features .*'preacts'"):
        FeatureTaps(timm_model, ("preacts",), role="student")
    taps = FeatureTaps(timm_model, ("stem", "stages", "embedding"))
    out = tapped_forward(timm_model.eval(), taps, torch.randn(1, 3, 64, 64))
    assert len(out.features["stages"]) == 4 and out.features["embedding"].shape == (1, 512)
