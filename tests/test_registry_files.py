"""Every file under papers/ and experiments/ loads and is consistent: each experiment resolves,
each table plans every cell (models, methods, schemes, datasets exist), and every published number
of a paper table reproduced at full scale maps to a cell, or is named not applicable with a reason.

Full-scale cells read CIFAR-100 or ImageNet, which are not on this machine: their data is swapped
for random tensors of the same shape and class count (CIFAR), or a folder tree of the same layout
(ImageNet), which is enough to build every model and method of the plan.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.catalog import experiment_registry, load_experiment, table_registry
from kdlab.cells import load_cell_config
from kdlab.errors import DataNotFoundError
from kdlab.paper_tables import GridSpec, plan_grid
from kdlab.pipeline import plan_experiment
from kdlab.published import load_all_papers
from kdlab.tables import load_table, plan_table

CIFAR_AS_RANDOM = {"cifar100": ["data.name=synthetic", "data.kwargs.classes=100", "data.kwargs.num_samples=256"]}


def test_every_experiment_resolves() -> None:
    for name in experiment_registry().names():
        config = load_cell_config(name, [])
        assert config.name == name, f"{name}: its name key says '{config.name}'"


def test_every_table_loads() -> None:
    names = table_registry().names()
    expected = {"crd-cifar100", "crd-cifar100-cross", "crd-mnist1d", "schemes-mnist1d", "dkd-cifar100"}
    expected.add("lm-distill-mini")
    assert expected <= set(names)
    for name in names:
        assert load_table(name).name == name


def _fake_imagenet(root: Path, classes: int = 3) -> None:
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "a.JPEG").write_bytes(b"")


def _grid_tables() -> list[GridSpec]:
    return [spec for name in table_registry().names() if isinstance(spec := load_table(name), GridSpec)]


def test_every_published_cell_maps_to_a_full_scale_cell() -> None:
    reproduced = set()
    for spec in _grid_tables():
        if spec.scale != "full":
            continue
        reproduced.add((spec.paper["key"], spec.published.name))
        assert spec.unmapped() == [], f"{spec.name}: published cells without a cell: {spec.unmapped()}"
    for key, paper in load_all_papers().items():
        for table in paper.tables:
            assert (key, table) in reproduced, f"papers/{key}.yaml table '{table}' has no full-scale kdlab table"


@pytest.mark.slow
def test_every_cell_of_every_table_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans each cell (builds its models, method and scheme), with the data swapped as above."""
    _fake_imagenet(tmp_path)
    monkeypatch.setenv("KDLAB_DATA_ROOT", str(tmp_path))
    runs = f"runtime.runs_dir={tmp_path / 'runs'}"
    planned = 0
    for spec in _grid_tables():
        dataset = load_experiment(next(iter(spec.pairs.values()))).data.name
        cells = plan_grid(spec, [0], [runs, *CIFAR_AS_RANDOM.get(dataset, [])])
        for cell in cells:
            assert cell.invalid is None, f"{spec.name}: {cell.row.key}@{cell.pair}: {cell.invalid}"
        planned += len(cells)
    for name in table_registry().names():
        spec = load_table(name)
        if not isinstance(spec, GridSpec):
            planned += len(plan_table(spec, [0], [runs]))
    assert planned > 300
    assert not (tmp_path / "runs").exists(), "planning must not write runs"


def test_without_the_dataset_a_full_scale_cell_says_so_and_is_not_invalid(tmp_path: Path) -> None:
    spec = load_table("crd-cifar100")
    assert isinstance(spec, GridSpec)
    cells = plan_grid(spec, [0], [f"data.root={tmp_path}"], only=["kd"])
    assert len(cells) == 7 and all(c.no_data for c in cells)
    assert "cifar-100-python" in str(cells[0].invalid) and "never downloads" in str(cells[0].invalid)
    with pytest.raises(DataNotFoundError, match="cifar-100-python"):
        plan_experiment(load_experiment("crd-vgg13-vgg8", [f"data.root={tmp_path}"]))
