"""The paper registry (papers/*.yaml): every file loads through kdlab.published, names only kdlab
methods and its own pairs, and the CRD tables line up with kdlab's crd-<pair> experiments."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.catalog import experiment_registry, load_experiment
from kdlab.errors import KdlabError
from kdlab.published import ACCURACY_AT, BASELINE_ROWS, load_all_papers, load_paper_file, paper_files

CRD_SAME_ARCH_PAIRS = {
    "wrn-40-2-wrn-16-2", "wrn-40-2-wrn-40-1", "resnet56-resnet20", "resnet110-resnet20",
    "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8",
}  # fmt: skip
CRD_ROWS = [
    "teacher",
    "student",
    "kd",
    "fitnet",
    "at",
    "sp",
    "cc",
    "vid",
    "rkd",
    "pkt",
    "ab",
    "ft",
    "fsp",
    "nst",
    "crd",
    "crd_kd",
]


def test_every_paper_loads_with_citation_and_tables() -> None:
    papers = load_all_papers()
    assert {"crd", "dkd", "takd", "dml", "byot", "mnist1d"} <= set(papers)
    for key, paper in papers.items():
        assert paper.title and paper.authors and paper.arxiv and str(paper.year) in paper.venue, key
        assert paper.tables or paper.numbers or paper.missing, key
        for name, table in paper.tables.items():
            assert table.source and table.protocol.get("dataset") and table.accuracy_at in ACCURACY_AT, (key, name)
            for row, values in table.results.items():
                assert set(values) <= set(table.pairs), (key, name, row)
            for missing in table.missing:
                assert set(missing.pairs) <= set(table.pairs), (key, name)


def test_crd_same_arch_table_is_complete_unless_listed_missing() -> None:
    table = load_all_papers()["crd"].tables["cifar100_same_arch"]
    assert set(table.pairs) == CRD_SAME_ARCH_PAIRS
    for method in CRD_ROWS:
        for pair in CRD_SAME_ARCH_PAIRS:
            assert table.value(method, pair) is not None or table.is_missing(method, pair), (method, pair)
    assert table.value("crd", "resnet32x4-resnet8x4") == 75.51  # RepDistiller README, table 1
    assert table.value("teacher", "wrn-40-2-wrn-16-2") == 75.61


def test_pairs_match_kdlab_crd_experiments() -> None:
    experiments = set(experiment_registry().names())
    crd_pairs = 0
    for paper in load_all_papers().values():
        for table in paper.tables.values():
            for key, pair in table.pairs.items():
                if f"crd-{key}" not in experiments:
                    continue
                crd_pairs += 1
                config = load_experiment(f"crd-{key}")
                assert (config.teacher.model.name, config.student.model.name) == (pair.teacher, pair.student), key
    assert crd_pairs >= 13
    crd = load_all_papers()["crd"]
    for name in ("cifar100_same_arch", "cifar100_cross_arch"):
        assert all(f"crd-{pair}" in experiments for pair in crd.tables[name].pairs), name


def test_mnist1d_keeps_the_flat_numbers_tables_read() -> None:
    assert load_all_papers()["mnist1d"].numbers["top1"]["cnn"] == 94
    assert "teacher" in BASELINE_ROWS and len(paper_files()) >= 6


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(
        'key: p\ntitle: T\nauthors: A\nvenue: "ICLR 2020"\nyear: 2020\narxiv: "1910.10699"\nnumbers: {}\n' + text
    )
    return path


TABLE = """tables:
  t:
    title: T
    source: S
    protocol: {dataset: CIFAR-100}
    accuracy_at: best_epoch
    metric: top1
    pairs: {a-b: {teacher: a, student: b}}
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (TABLE + "    results: {KD-x: {a-b: 1.0}}\n", "tables.t.results.KD-x: row name 'KD-x' must be lower-case"),
        (
            TABLE.replace("accuracy_at: best_epoch", "accuracy_at: best") + "    results: {kd: {a-b: 1.0}}\n",
            "unknown p.yaml: tables.t.accuracy_at 'best'",
        ),
        (TABLE + "    results: {kd: {c-d: 1.0}}\n", "p.yaml: tables.t.results.kd.c-d: pair not listed under 'pairs'"),
        (TABLE + "    results: {kd: {a-b: n/a}}\n", "p.yaml: tables.t.results.kd.a-b: expected a number"),
        (TABLE.replace("    source: S\n", "") + "    results: {kd: {a-b: 1}}\n", "p.yaml: tables.t.source: required"),
        (
            TABLE.replace("    protocol: {dataset: CIFAR-100}\n", "") + "    results: {kd: {a-b: 1}}\n",
            "tables.t.protocol",
        ),
        ("tables: {}\n", "p.yaml: missing: a paper without numbers or tables must say why"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(KdlabError) as error:
        load_paper_file(_write(tmp_path, body))
    assert message in str(error.value) and "\n" not in str(error.value)
