"""The experiment and table registries, read from the YAML files shipped in ``kdlab.experiments``
(experiments anywhere below it, named by file; tables in its ``tables/`` folder).

An experiment file may ``extends: other-experiment`` (or a list): the named files are merged
first, then this one, then the command-line overrides. ``kdlab run`` also takes a path to any
YAML file outside the package.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from kdlab.config import ExperimentConfig, MethodConfig, build_config, load_yaml
from kdlab.errors import ConfigError
from kdlab.registry import Registry

EXPERIMENTS: Registry[Path] = Registry("experiment")
TABLES: Registry[Path] = Registry("table")


def _package_dir(package: str) -> Path:
    return Path(str(resources.files(package)))


def experiments_dir() -> Path:
    return _package_dir("kdlab.experiments")


def papers_dir() -> Path:
    return _package_dir("kdlab.papers")


@cache
def _load_registries() -> None:
    tables = experiments_dir() / "tables"
    for path in sorted(experiments_dir().rglob("*.yaml")):
        if tables in path.parents:
            continue
        data = load_yaml(path)
        _check_name(path, data)
        if path.stem in EXPERIMENTS:
            raise ConfigError(f"experiment '{path.stem}' is defined twice: {EXPERIMENTS.get(path.stem)} and {path}")
        EXPERIMENTS.add(path.stem, path, str(data.get("description", "")))
    for path in sorted((experiments_dir() / "tables").glob("*.yaml")):
        data = load_yaml(path)
        _check_name(path, data)
        scale = f"[{data['scale']}] " if "scale" in data else ""
        TABLES.add(path.stem, path, scale + str(data.get("title", data.get("description", ""))))


def _check_name(path: Path, data: dict[str, Any]) -> None:
    if data.get("name", path.stem) != path.stem:
        raise ConfigError(f"{path}: 'name: {data['name']}' must equal the file name '{path.stem}'")


def experiment_registry() -> Registry[Path]:
    _load_registries()
    return EXPERIMENTS


def table_registry() -> Registry[Path]:
    _load_registries()
    return TABLES


def experiment_path(name_or_path: str) -> Path:
    """A registered experiment name, or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    return experiment_registry().get(name_or_path)


def experiment_layers(name_or_path: str, _chain: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The YAML layers of an experiment, bases first (``extends`` resolved, cycles refused)."""
    if name_or_path in _chain:
        raise ConfigError(f"experiment 'extends' cycle: {' -> '.join((*_chain, name_or_path))}")
    path = experiment_path(name_or_path)
    data = dict(load_yaml(path))
    bases = data.pop("extends", [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    layers: list[tuple[str, dict[str, Any]]] = []
    for base in bases:
        layers += experiment_layers(base, (*_chain, name_or_path))
    data.setdefault("name", path.stem)
    layers.append((str(path), data))
    return layers


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> ExperimentConfig:
    """The typed config of an experiment with dotted ``key=value`` overrides applied.

    Switching the method on the command line (``method.name=dkd``) drops the YAML's options of the
    method it replaces, which would not fit the new one; the experiment's preset for the chosen
    method (``method_presets``) is merged beneath the command-line overrides.
    """
    layers = experiment_layers(name_or_path)
    if is_lm_layers(layers):
        raise ConfigError(
            f"experiment '{name_or_path}' is a language-model experiment (kind: lm); it runs with `kdlab run` "
            "and in LM tables, not as an image-classification experiment"
        )
    config = build_config(layers, list(overrides))
    if config.method.name != _yaml_method_name(layers):
        layers = [(source, _without_method_options(layer)) for source, layer in layers]
    preset = config.method_presets.get(config.method.name)
    if preset is not None:
        fields = {"params": preset.params, "weights": preset.weights}
        layers.append((f"method_presets.{config.method.name}", {"method": {k: v for k, v in fields.items() if v}}))
    return build_config(layers, list(overrides))


def is_lm_experiment(name_or_path: str) -> bool:
    """Whether an experiment is a causal-LM one (``kind: lm``, see kdlab.lm.config)."""
    return is_lm_layers(experiment_layers(name_or_path))


def load_lm_experiment(name_or_path: str, overrides: list[str] = ()) -> Any:
    """The typed :class:`kdlab.lm.config.LMExperimentConfig` of a ``kind: lm`` experiment."""
    from kdlab.lm.config import build_lm_config

    return build_lm_config(experiment_layers(name_or_path), list(overrides))


def is_lm_layers(layers: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether YAML layers declare ``kind: lm`` (the last layer that says wins)."""
    kinds = [layer["kind"] for _, layer in layers if "kind" in layer]
    return bool(kinds) and kinds[-1] == "lm"


def _yaml_method_name(layers: list[tuple[str, dict[str, Any]]]) -> str:
    """The method the experiment's YAML files choose (the last layer that names one)."""
    for _, layer in reversed(layers):
        method = layer.get("method")
        if isinstance(method, dict) and "name" in method:
            return str(method["name"])
    return MethodConfig().name


def _without_method_options(layer: dict[str, Any]) -> dict[str, Any]:
    method = layer.get("method")
    if not isinstance(method, dict):
        return layer
    return {**layer, "method": {k: v for k, v in method.items() if k not in ("params", "weights")}}
