"""Typed configs: YAML layers, dotted overrides, and one-line errors for bad keys and values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.catalog import experiment_registry, load_experiment, papers_dir, table_registry
from kdlab.cells import load_cell_config
from kdlab.config import ExperimentConfig, build_config, config_hash, load_yaml
from kdlab.errors import ConfigError, UnknownNameError
from kdlab.paper_tables import GridSpec
from kdlab.tables import load_table

REPO = Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_merged_over_yaml() -> None:
    config = load_experiment("mnist1d-kd", ["student.train.epochs=7", "method.params.temperature=2", "seed=3"])
    assert isinstance(config, ExperimentConfig)
    assert config.student.train.epochs == 7 and config.seed == 3
    assert config.method.name == "kd" and config.method.params["temperature"] == 2
    assert config.student.train.optimizer.lr == pytest.approx(0.01)  # from the YAML, not the default


def test_extends_merges_base_first() -> None:
    kd = load_experiment("mnist1d-kd")
    ce = load_experiment("mnist1d-ce")
    assert kd.name == "mnist1d-kd" and ce.name == "mnist1d-ce"
    assert kd.student == ce.student and kd.teacher == ce.teacher
    assert (kd.method.name, ce.method.name) == ("kd", "ce")


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("student.train.epoch=3", r"bad 'student\.train\.epoch'.*Did you mean: 'epochs'"),
        ("student.train.epochs=abc", r"bad 'student\.train\.epochs'.*'abc'.*Integer"),
        ("nonsense=1", r"bad 'nonsense'"),
        ("seed", r"expected dotted\.key=value"),
        ("data.batch_size=1.5", r"bad 'data\.batch_size'"),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as error:
        load_experiment("mnist1d-kd", [override])
    assert "\n" not in str(error.value)


def test_unknown_experiment_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown experiment 'mnist1d-kdd'; did you mean 'mnist1d-kd'"):
        load_experiment("mnist1d-kdd")


def test_extends_cycle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(str(tmp_path / "a.yaml"))


def test_a_yaml_file_outside_the_package_runs_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("extends: mnist1d-kd\nstudent: {train: {epochs: 2}}\n")
    config = load_experiment(str(path))
    assert config.name == "mine" and config.student.train.epochs == 2 and config.method.name == "kd"


def test_config_hash_ignores_key_order_but_not_values() -> None:
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_every_yaml_in_the_repository_parses() -> None:
    """Experiments build typed configs, tables resolve their papers and rows, papers load."""
    experiments = experiment_registry().names()
    assert experiments, "no experiments found"
    for name in experiments:
        load_cell_config(name, [])  # image-classification or kind: lm
    for name in table_registry().names():
        table = load_table(name)
        used = table.pairs.values() if isinstance(table, GridSpec) else [row.experiment for row in table.rows]
        for experiment in used:
            assert experiment in experiments
    for path in papers_dir().glob("*.yaml"):
        assert {"title", "authors", "numbers"} <= set(load_yaml(path))
    yaml_files = {p.resolve() for p in REPO.glob("experiments/**/*.yaml")} | {
        p.resolve() for p in REPO.glob("papers/*.yaml")
    }
    assert len(yaml_files) == len(experiments) + len(table_registry()) + len(list(papers_dir().glob("*.yaml")))


def test_build_config_names_the_bad_layer() -> None:
    with pytest.raises(ConfigError, match=r"^my.yaml: bad 'student\.train\.epochs'"):
        build_config([("my.yaml", {"student": {"train": {"epochs": "many"}}})])


def test_switching_method_drops_the_replaced_methods_options() -> None:
    config = load_experiment("mnist1d-kd", ["method.name=ce"])
    assert config.method.params == {} and config.method.weights == {}  # KD's temperature would not fit CE
    config = load_experiment("mnist1d-kd", ["method.name=ce", "method.weights.ce=2"])
    assert config.method.weights == {"ce": 2.0}
    assert load_experiment("mnist1d-kd", ["method.name=kd"]).method.params == {"temperature": 1.0}


def test_method_presets_apply_to_their_method_beneath_overrides(tmp_path: Path) -> None:
    path = tmp_path / "pair.yaml"
    presets = "method_presets:\n  kd: {params: {temperature: 7.0}}\n  ce: {weights: {ce: 3}}\n"
    path.write_text("extends: mnist1d-kd\n" + presets)
    assert load_experiment(str(path)).method.params == {"temperature": 7.0}
    assert load_experiment(str(path), ["method.params.temperature=2"]).method.params == {"temperature": 2}
    switched = load_experiment(str(path), ["method.name=ce"]).method
    assert switched.params == {} and switched.weights == {"ce": 3}


def test_options_added_later_stay_out_of_run_specs_at_their_default(tmp_path: Path) -> None:
    from kdlab.config import spec_dict
    from kdlab.planning import plan_experiment

    runs = f"runtime.runs_dir={tmp_path}"
    config = build_config([], ["teacher.train.optimizer.sam=none", "teacher.ensemble=1", "student.train.augment=null"])
    teacher = spec_dict(config.teacher)
    assert "ensemble" not in teacher and "source" not in teacher and "store" not in teacher
    assert "sam" not in teacher["train"]["optimizer"] and "mix" not in teacher["train"]
    assert set(teacher["train"]["optimizer"]) == {"name", "lr", "momentum", "weight_decay", "nesterov"}
    asam = build_config([], ["teacher.train.optimizer.sam=asam"])
    assert spec_dict(asam.teacher)["train"]["optimizer"]["sam"] == "asam"
    # A recipe's own augmentation lands in its data spec; the same effective data, the same run.
    default = plan_experiment(load_experiment("mnist1d-kd", [runs]))
    explicit = plan_experiment(load_experiment("mnist1d-kd", [runs, "teacher.train.augment=true"]))
    off = plan_experiment(load_experiment("mnist1d-kd", [runs, "student.train.augment=false"]))
    assert explicit.teacher_run == default.teacher_run == off.teacher_run
    assert off.student_run != default.student_run and off.student_run.spec["data"]["augment"] is False


def test_the_wheel_lists_every_folder_of_code_and_yaml() -> None:
    """setuptools' package list is explicit: a new folder left out would vanish from `pip install .`."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, data = set(setup["packages"]), setup["package-data"]
    for package, folder in setup["package-dir"].items():
        for path in sorted((root / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml") or "__pycache__" in path.parts:
                continue
            name = ".".join([package, *path.parent.relative_to(root / folder).parts])
            assert name in packages, f"{path.relative_to(root)}: package {name} is not in pyproject's packages"
            if path.suffix == ".yaml":
                assert "*.yaml" in data.get(name, []), f"{path.relative_to(root)}: {name} lacks *.yaml package data"
