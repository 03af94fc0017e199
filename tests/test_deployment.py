"""mdafx/deployment.py: ONNX checker + strict shape inference + onnxruntime parity, metadata, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

from mdafx import deployment as export
from mdafx.deployment import ExportReport, export_onnx, onnx_latency, read_onnx_metadata
from mdafx.errors import ExportError, OutputError, PreconditionError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.ort
SIZE = 32


class TinyNet(nn.Module):
    """Residual add, concat, view(size(0), -1), and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.aux = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        x = torch.cat([x, x + self.branch(x)], dim=1)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        return self.fc(x), self.aux(x)


def tiny_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8,
                                       bn_size=2, num_classes=10)


ZOO = {
    "tiny_net": TinyNet,
    "tiny_densenet": tiny_densenet,
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(
        num_classes=10, aux_logits=False, init_weights=True),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}
SLOW = {"resnet18", "mobilenet_v3_small", "googlenet", "densenet121"}


def traced(name: str) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return torch.fx.symbolic_trace(model)


def example() -> torch.Tensor:
    return torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


METADATA = {
    "classes": [{"index": 0, "name": "cat", "source": "resnet18/cifar10"}],
    "input": {"size": [SIZE, SIZE], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
    "scale": [0.125],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportReport:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(traced("tiny_net"), path, example(), METADATA)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def test_onnx_matches_torch_at_batch_1_and_3(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(traced(name), path, example(), {"model": name})
    assert report.path == path and report.file_size == path.stat().st_size
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert set(report.max_abs_err) == set(report.max_rel_err) == {1, 3}
    assert max(report.max_abs_err.values()) <= 1e-3
    proto = onnx.load(str(path))
    assert report.opset == next(o.version for o in proto.opset_import if o.domain == "")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert [t.name for t in tmp_path.iterdir()] == [path.name]


def test_exported_file_passes_checker_and_strict_shape_inference(exported: ExportReport) -> None:
    proto = onnx.load(str(exported.path))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    assert proto.graph.input[0].name == "input"


def test_metadata_props_are_json(exported: ExportReport) -> None:
    proto = onnx.load(str(exported.path))
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in METADATA.items():
        assert json.loads(props[key]) == value
    assert isinstance(json.loads(props["mdafx_version"]), str)
    version = json.loads(props["mdafx_version"])
    assert read_onnx_metadata(exported.path) == {**METADATA, "mdafx_version": version}


def test_report_prints_a_summary(exported: ExportReport) -> None:
    text = str(exported)
    assert str(exported.path) in text and "dynamo" in text and "b3: abs" in text


def test_onnx_latency_is_positive(exported: ExportReport) -> None:
    for batch in (1, 3):
        ms = onnx_latency(exported.path, batch_size=batch, warmup=1, iters=3, threads=1)
        assert 0.0 < ms < 10_000.0


def test_broken_parity_raises_and_leaves_no_file(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    real = export._run_onnxruntime

    def off_by_a_bit(path: Path, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
        return [[out + 1e-2 for out in outs] for outs in real(path, inputs)]

    monkeypatch.setattr(export, "_run_onnxruntime", off_by_a_bit)
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"does not match torch.*max abs err 1\.0\d*e-02"):
        export_onnx(traced("tiny_net"), path, example())
    assert list(tmp_path.iterdir()) == []


def test_model_whose_export_differs_is_refused(tmp_path: Path) -> None:
    class Noisy(nn.Module):  # torch's and onnxruntime's random streams differ
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    with pytest.raises(ExportError, match="batch 1 output: .* elements off") as info:
        export_onnx(torch.fx.symbolic_trace(Noisy()), tmp_path / "noisy.onnx", torch.randn(1, 8))
    assert "batch 3" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_torchscript_fallback_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ExportError("torch.export is having a bad day")

    monkeypatch.setattr(export, "export_program", broken)
    report = export_onnx(traced("tiny_net"), tmp_path / "m.onnx", example())
    assert report.exporter == "torchscript"
    assert "bad day" in (report.fallback_reason or "") and "fallback" in str(report)
    assert set(report.max_abs_err) == {1, 3}


def test_check_false_skips_parity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(export, "_run_onnxruntime", lambda *a: pytest.fail("parity ran"))
    report = export_onnx(traced("tiny_net"), tmp_path / "m.onnx", example(), check=False)
    assert report.max_abs_err == {} and report.path.exists()


def test_checker_failure_raises_and_leaves_no_file(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    def reject(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("nope")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(ExportError, match="onnx.checker rejected"):
        export_onnx(traced("tiny_net"), tmp_path / "m.onnx", example())
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"precious")
    with pytest.raises(OutputError, match="overwrite=True"):
        export_onnx(traced("tiny_net"), path, example())
    assert path.read_bytes() == b"precious"
    export_onnx(traced("tiny_net"), path, example(), {"v": 2}, overwrite=True)
    assert read_onnx_metadata(path)["v"] == 2
