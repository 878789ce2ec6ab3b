"""`kdlab export`: ONNX and TorchScript files of an MNIST-1D student and of resnet8x4, loaded here
by onnxruntime and torch.jit directly and compared with the PyTorch student rebuilt from its
model.pt; int8 files and their accuracy drop; the errors for unfinished runs, unknown options
and ops a format cannot express."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import yaml
from deploy_runs import QUIET, mnist1d_kd_run, resnet8x4_run, write_fake_cifar100
from fakedata import accept_written_cifar
from torch import nn
from torchvision.datasets import CIFAR100

from kdlab.catalog import load_experiment
from kdlab.config import DataConfig
from kdlab.data import create_datamodule
from kdlab.deploy.export import export_run, read_exports
from kdlab.deploy.finished import NotFinishedError
from kdlab.deploy.formats import EXPORT_FORMATS, ExportError, failed_op
from kdlab.errors import ConfigError, UnknownNameError
from kdlab.modelio import save_model
from kdlab.models import create_model
from kdlab.pipeline import run_experiment

KDLAB = Path(sys.executable).parent / "kdlab"


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mnist1d_kd_run(tmp_path_factory.mktemp("runs")).student_run.dir


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar100(root)
    return root


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory, cifar_root: Path) -> Path:
    return resnet8x4_run(tmp_path_factory.mktemp("runs"), cifar_root).student_run.dir


@pytest.fixture
def accept_cifar(monkeypatch: pytest.MonkeyPatch, cifar_root: Path) -> None:
    accept_written_cifar(monkeypatch, CIFAR100, cifar_root)


def pytorch_student(run: Path, num_classes: int) -> nn.Module:
    """The student as the run saved it, rebuilt without kdlab.deploy."""
    payload = torch.load(run / "model.pt", weights_only=False)
    model = create_model(payload["model"], num_classes=num_classes, **payload["kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def evaluation_batches(
    run: Path, root: Path | None, split: str = "parity"
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """The split the export's parity check uses (validation if held out, else test), or ``test``."""
    spec = yaml.safe_load((run / "config.yaml").read_text())
    datamodule = create_datamodule(DataConfig(**{**spec["data"], "root": root, "augment": False}), spec["seed"])
    validation = split == "parity" and datamodule.has_validation
    loader = datamodule.val_dataloader() if validation else datamodule.test_dataloader()
    batches = list(loader)
    return [b["input"] for b in batches], [b["target"] for b in batches], datamodule.num_classes


def file_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The written file, opened with onnxruntime or torch.jit directly (not through kdlab)."""
    if path.suffix == ".onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    module = torch.jit.load(str(path)).eval()
    return lambda x: module(x).detach()


def compare(run: Path, path: Path, root: Path | None, split: str = "parity") -> tuple[float, float, float, float]:
    """Agreement (%), max |Δ|, PyTorch top-1 and the file's top-1 on the parity split, computed here."""
    inputs, targets, classes = evaluation_batches(run, root, split)
    model, runner = pytorch_student(run, classes), file_runner(path)
    agree = correct_ref = correct_file = total = 0
    diff = 0.0
    with torch.no_grad():
        for x, y in zip(inputs, targets, strict=True):
            ref, got = model(x), runner(x)
            diff = max(diff, (ref - got).abs().max().item())
            agree += (ref.argmax(1) == got.argmax(1)).sum().item()
            correct_ref += (ref.argmax(1) == y).sum().item()
            correct_file += (got.argmax(1) == y).sum().item()
            total += len(y)
    return 100 * agree / total, diff, 100 * correct_ref / total, 100 * correct_file / total


@pytest.mark.parametrize("format_name", EXPORT_FORMATS.names())  # every registered format
def test_mnist1d_student_exports_load_and_agree(mnist1d_run: Path, format_name: str) -> None:
    (written,) = export_run(mnist1d_run, format_name)
    assert written.path == mnist1d_run / "export" / f"student{EXPORT_FORMATS.get(format_name).suffix}"
    agreement, diff, reference, exported = compare(mnist1d_run, written.path, None)
    assert agreement >= 99.5 and diff < 1e-4
    assert written.parity.agreement == pytest.approx(agreement) and written.parity.samples == 400  # 10% of 4000
    assert written.parity.reference_top1 == pytest.approx(reference)
    assert written.parity.exported_top1 == pytest.approx(exported)
    assert read_exports(mnist1d_run)[written.path.name]["agreement"] == pytest.approx(agreement)
    # A dynamic batch axis: one sample and an odd batch run too.
    runner = file_runner(written.path)
    model = pytorch_student(mnist1d_run, 10)
    for batch in (1, 7):
        x = torch.randn(batch, 40)
        torch.testing.assert_close(runner(x), model(x).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("format_name", ["onnx", "torchscript"])
def test_resnet8x4_exports_load_and_agree(
    resnet_run: Path, cifar_root: Path, accept_cifar: None, format_name: str
) -> None:
    (written,) = export_run(resnet_run, format_name, data_root=str(cifar_root))
    assert written.split == "test"  # the CIFAR protocol holds nothing out
    agreement, diff, reference, exported = compare(resnet_run, written.path, cifar_root)
    assert agreement >= 99.5 and diff < 1e-3
    inputs, _, _ = evaluation_batches(resnet_run, cifar_root)
    predictions = torch.cat([pytorch_student(resnet_run, 100)(x).argmax(1) for x in inputs])
    assert predictions.unique().numel() >= 8  # agreement over many classes, not one repeated guess
    assert written.parity.samples == 200 and written.parity.agreement == pytest.approx(agreement)
    assert (written.parity.reference_top1, written.parity.exported_top1) == pytest.approx((reference, exported))
    runner = file_runner(written.path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(runner(x), pytorch_student(resnet_run, 100)(x).detach(), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(("format_name", "mode"), [("onnx", "static"), ("onnx", "dynamic"), ("torchscript", "static")])
def test_resnet8x4_int8_is_smaller_and_reports_its_accuracy_drop(
    resnet_run: Path, cifar_root: Path, accept_cifar: None, format_name: str, mode: str
) -> None:
    fp32, int8 = export_run(resnet_run, format_name, mode, data_root=str(cifar_root), calibration_samples=64)
    assert int8.path.name == f"student.int8-{mode}{EXPORT_FORMATS.get(format_name).suffix}"
    assert int8.size_bytes < 0.4 * fp32.size_bytes  # int8 weights: a quarter of fp32, plus scales
    agreement, _, reference, exported = compare(resnet_run, int8.path, cifar_root)
    assert int8.parity.agreement == pytest.approx(agreement)
    assert int8.parity.top1_drop == pytest.approx(reference - exported)
    assert read_exports(resnet_run)[int8.path.name]["top1_drop"] == pytest.approx(reference - exported)


def test_mnist1d_int8_files_for_both_formats_and_modes(mnist1d_run: Path) -> None:
    for format_name in ("onnx", "torchscript"):
        for mode in ("static", "dynamic"):
            fp32, int8 = export_run(mnist1d_run, format_name, mode, calibration_samples=200)
            agreement, _, reference, exported = compare(mnist1d_run, int8.path, None)
            assert fp32.parity.agreement >= 99.5 and fp32.precision == "fp32"
            assert int8.precision == f"int8-{mode}" and int8.parity.agreement == pytest.approx(agreement)
            assert int8.parity.top1_drop == pytest.approx(reference - exported)
            assert agreement > 80  # int8 rounding moves only close calls
            agreement, _, reference, exported = compare(mnist1d_run, int8.path, None, "test")
            assert int8.test.samples == 1000 and int8.test.agreement == pytest.approx(agreement)
            assert int8.test.top1_drop == pytest.approx(reference - exported)


def test_cli_export_prints_the_parity_table(mnist1d_run: Path) -> None:
    result = subprocess.run(
        [str(KDLAB), "export", str(mnist1d_run), "--format", "onnx", "--int8", "dynamic"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "student.onnx" in result.stdout and "student.int8-dynamic.onnx" in result.stdout
    assert "top-1 drop" in result.stdout and "100.00" in result.stdout


def test_an_unfinished_run_is_refused_with_its_name(mnist1d_run: Path, tmp_path: Path) -> None:
    unfinished = tmp_path / "runs" / "mnist1d-kd" / "abc123"
    shutil.copytree(mnist1d_run, unfinished, ignore=shutil.ignore_patterns("export"))
    (unfinished / "metrics.json").unlink()
    (unfinished / "status.json").write_text(json.dumps({"state": "running"}))
    with pytest.raises(NotFinishedError, match=rf"run {unfinished} has not finished \(state: running\)"):
        export_run(unfinished, "onnx")
    result = subprocess.run([str(KDLAB), "export", str(unfinished), "--format", "onnx"], capture_output=True, text=True)
    assert result.returncode == 2 and f"run {unfinished} has not finished" in result.stderr
    assert not (unfinished / "export").exists()


def test_bad_options_and_folders_are_refused_before_loading(mnist1d_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="unknown export format 'onxx'; did you mean 'onnx'"):
        export_run(mnist1d_run, "onxx")
    with pytest.raises(UnknownNameError, match="unknown int8 mode 'statc'; did you mean 'static'"):
        export_run(mnist1d_run, "onnx", "statc")
    with pytest.raises(ConfigError, match="--calibration-samples must be at least 1, got 0"):
        export_run(mnist1d_run, "onnx", "static", calibration_samples=0)
    with pytest.raises(ConfigError, match="is not a kdlab run folder"):
        export_run(tmp_path, "onnx")
    teacher = mnist1d_run.parent.parent / "teachers"
    (teacher_run,) = teacher.iterdir()
    with pytest.raises(ConfigError, match="is a teacher run, not a student run"):
        export_run(teacher_run, "onnx")


class BesselStudent(nn.Module):
    """An MLP whose forward uses an op with no ONNX function (Bessel J0 of the input)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(40, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.special.bessel_j0(x))


def test_an_op_onnx_cannot_express_is_named(mnist1d_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run whose student uses Bessel J0: ONNX names the op, TorchScript exports it."""
    run = tmp_path / "runs" / "mnist1d-kd" / "bessel"
    shutil.copytree(mnist1d_run, run, ignore=shutil.ignore_patterns("export"))
    spec = yaml.safe_load((run / "config.yaml").read_text())
    spec["student"]["model"] = {"name": "bessel_mlp", "kwargs": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(spec))
    save_model(run / "model.pt", BesselStudent(), "bessel_mlp", {})
    monkeypatch.setattr("kdlab.deploy.finished.create_model", lambda name, **kwargs: BesselStudent(**kwargs))
    with pytest.raises(ExportError, match=rf"run {run}: ONNX cannot express op 'prims.bessel_j0' of BesselStudent"):
        export_run(run, "onnx")
    assert not list((run / "export").glob("*.onnx")) and not list((run / "export").glob(".*tmp*"))
    (written,) = export_run(run, "torchscript")
    assert written.parity.agreement == 100.0


def test_failed_op_reads_the_cause_chain() -> None:
    try:
        try:
            raise RuntimeError("No ONNX function found for <OpOverload(op='aten.histc', overload='default')>.")
        except RuntimeError as inner:
            raise ValueError("Failed to convert the exported program to an ONNX model.") from inner
    except ValueError as outer:
        assert failed_op(outer) == "aten.histc"
    assert failed_op(ValueError("something else")) is None


def test_a_file_that_disagrees_is_not_kept(mnist1d_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity guard: a file of another model (fresh weights) fails 99.5% and is deleted."""
    onnx = EXPORT_FORMATS.get("onnx")
    real_export = onnx.export

    def export_other_weights(self: object, model: nn.Module, example: torch.Tensor, path: Path) -> None:
        torch.manual_seed(123)
        real_export(self, create_model("mnist1d_mlp", num_classes=10).eval(), example, path)

    monkeypatch.setattr(onnx, "export", export_other_weights)
    target = mnist1d_run / "export" / "student.onnx"
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(ExportError, match=r"disagrees with the PyTorch student .* top-1 agreement \d"):
        export_run(mnist1d_run, "onnx")
    assert (target.read_bytes() if target.exists() else None) == before
    assert not list(target.parent.glob(".*tmp*"))


@pytest.mark.slow
def test_a_quantized_scheme_student_exports_its_int8_model_to_torchscript_only(tmp_path: Path) -> None:
    """The saved int8 model is rebuilt exactly (its test top-1 is the run's int8 top-1); ONNX
    names the torch int8 layer it cannot express."""
    outcome = run_experiment(
        load_experiment(
            "mnist1d-quantized",
            [f"runtime.runs_dir={tmp_path}", "teacher.train.epochs=2", "student.train.epochs=2", *QUIET],
        )
    )
    run = outcome.student_run.dir
    (written,) = export_run(run, "torchscript")
    assert written.precision == "int8-qat" and written.parity.agreement == 100.0
    module = torch.jit.load(str(written.path))
    datamodule = create_datamodule(DataConfig(name="mnist1d"), 0)
    test = list(datamodule.test_dataloader())
    correct = sum((module(b["input"]).argmax(1) == b["target"]).sum().item() for b in test)
    assert 100 * correct / sum(len(b["target"]) for b in test) == pytest.approx(outcome.student["test/int8/top1"])
    with pytest.raises(ExportError, match=r"ONNX cannot express torch's int8 op of layer 'layer1\.0'"):
        export_run(run, "onnx")
    with pytest.raises(ConfigError, match="is already int8 \\(quantized scheme, 8 bits\\)"):
        export_run(run, "torchscript", "static")


@pytest.mark.slow
def test_a_byot_student_exports_without_its_exit_heads(tmp_path: Path) -> None:
    """Self-distillation trains exit heads on the student (8K parameters beside its 5.2K); the
    exported file holds the student's weights alone and has one output, the logits."""
    overrides = [f"runtime.runs_dir={tmp_path}", "student.train.epochs=1", *QUIET]
    run = run_experiment(load_experiment("mnist1d-byot", overrides)).student_run.dir
    (written,) = export_run(run, "onnx")
    graph = onnx.load(str(written.path)).graph
    exported = sum(int(np.prod(tensor.dims)) for tensor in graph.initializer)
    student = sum(p.numel() for p in pytorch_student(run, 10).parameters())
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    exits = sum(v.numel() for k, v in trained.items() if ".exits." in k or k.startswith("exits."))
    assert exits > student and student <= exported < student + 32  # a few shape constants besides
    assert [output.name for output in graph.output] == ["logits"]
