"""The one Registry: lookups, did-you-mean errors and the registries built on it."""

from __future__ import annotations

import pytest

from kdlab.data import DATASETS
from kdlab.errors import KdlabError, UnknownNameError
from kdlab.methods import METHODS
from kdlab.models import MODELS
from kdlab.registry import Registry
from kdlab.schemes import SCHEMES


def test_unknown_name_lists_valid_names_and_close_matches() -> None:
    registry: Registry[int] = Registry("method")
    for name in ("kd", "dkd", "crd", "fitnet"):
        registry.add(name, 0, "x")
    with pytest.raises(UnknownNameError) as error:
        registry.get("kdd")
    message = str(error.value)
    assert message.startswith("unknown method 'kdd'; did you mean ")
    assert "'kd'" in message.split("(valid")[0] and "'dkd'" in message.split("(valid")[0]
    assert "(valid: crd, dkd, fitnet, kd)" in message
    assert "\n" not in message


def test_no_hint_when_nothing_is_close() -> None:
    registry: Registry[int] = Registry("dataset")
    registry.add("mnist1d", 1)
    with pytest.raises(UnknownNameError, match=r"^unknown dataset 'zzz' \(valid: mnist1d\)$"):
        registry.get("zzz")


def test_duplicate_registration_is_refused() -> None:
    registry: Registry[int] = Registry("model")
    registry.add("a", 1)
    with pytest.raises(KdlabError, match="registered twice"):
        registry.add("a", 2)


def test_decorator_uses_name_attribute_and_docstring() -> None:
    registry: Registry[type] = Registry("method")

    @registry.register()
    class Thing:
        """First line of the doc.

        More text."""

        name = "thing"

    assert registry.entry("thing").description == "First line of the doc."
    assert registry.get("thing") is Thing


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        (METHODS, {"ce", "kd"}),
        (SCHEMES, {"offline"}),
        (DATASETS, {"mnist1d", "cifar10", "cifar100", "imagefolder"}),
    ],
)
def test_builtin_registries_hold_their_entries_with_descriptions(registry: Registry, expected: set[str]) -> None:
    assert expected <= set(registry.names())
    assert all(entry.description for entry in registry.entries())


def test_models_registry_has_the_zoo() -> None:
    assert {"resnet8x4", "resnet32x4", "wrn_40_2", "vgg13", "mnist1d_cnn", "mnist1d_mlp"} <= set(MODELS.names())
