"""mdafx/assembly.py (MDA.md §2): every assembled logit equals the scaled component logit, in
both layouts, from objects and from files."""
from __future__ import annotations

import pytest
import torch

from mdafx import api
from mdafx.api import Calibration, InputFormat, assemble
from mdafx.errors import PreconditionError
from zoo import random_component as component


def expected(comps, scales, x_per_comp):
    with torch.no_grad():
        return torch.cat([c(x) * s for c, s, x in zip(comps, scales, x_per_comp)], 1)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "googlenet", "mobilenet_v3_small"])
@pytest.mark.parametrize("layout", ["parallel", "merged"])
def test_assembled_logits_equal_scaled_components(arch, layout):
    comps = [component(arch, [3, 5], seed=0), component(arch, [8, 1, 0], seed=1)]
    scales = [torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25, 3.0])]
    asm = assemble(comps, Calibration.scaling(scales), layout=layout)
    x = torch.randn(3, *comps[0].input_shape[1:])
    with torch.no_grad():
        got = asm(x)
    want = expected(comps, scales, [x, x])
    assert asm.class_names == ["c3", "c5", "c8", "c1", "c0"]
    assert got.shape == (3, 5)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert [s["sources"][0]["component"] for s in asm.class_map] == [0, 0, 1, 1, 1]


def test_parallel_across_architectures_and_input_formats():
    fmt_a = InputFormat((32, 32), 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    fmt_b = InputFormat((48, 48), 3, (0.4, 0.45, 0.5), (0.2, 0.2, 0.2))
    a = component("resnet18", [2, 4], fmt=fmt_a)
    b = component("mobilenet_v3_small", [6, 7], seed=1, size=48, fmt=fmt_b)
    asm = assemble([a, b], Calibration.scaling([torch.ones(2), torch.tensor([2.0, 0.5])]))
    pixels = torch.rand(2, 3, 32, 32)
    x_shared = (pixels - torch.tensor(fmt_a.mean).view(1, 3, 1, 1)) / torch.tensor(fmt_a.std).view(1, 3, 1, 1)
    x_b = torch.nn.functional.interpolate(pixels, size=(48, 48), mode="bilinear", align_corners=False)
    x_b = (x_b - torch.tensor(fmt_b.mean).view(1, 3, 1, 1)) / torch.tensor(fmt_b.std).view(1, 3, 1, 1)
    want = expected([a, b], [torch.ones(2), torch.tensor([2.0, 0.5])], [x_shared, x_b])
    with torch.no_grad():
        got = asm(x_shared)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(PreconditionError, match="same input format"):
        assemble([a, b], layout="merged")


def test_duplicate_class_names_merge_by_max():
    a, b = component("resnet18", [3, 5]), component("resnet18", [5, 7], seed=1)
    asm = assemble([a, b])
    assert asm.class_names == ["c3", "c5", "c7"]
    assert len(asm.class_map[1]["sources"]) == 2
    x = torch.randn(2, *a.input_shape[1:])
    with torch.no_grad():
        la, lb, got = a(x), b(x), asm(x)
    want = torch.stack([la[:, 0], torch.maximum(la[:, 1], lb[:, 0]), lb[:, 1]], 1)
    assert torch.allclose(got, want, atol=1e-5)


def test_merged_needs_isomorphic_components():
    with pytest.raises(PreconditionError, match="isomorphic"):
        assemble([component("resnet18", [1, 2]), component("squeezenet1_1", [3, 4])], layout="merged")


@pytest.mark.ort
@pytest.mark.parametrize("layout", ["parallel", "merged"])
def test_components_and_assembled_models_export_and_round_trip(layout, tmp_path):
    from mdafx.deployment import export_onnx, read_onnx_metadata
    from mdafx.modelfile import load_model, save_model

    # squeezenet: concats (fire modules) at a size the exporter handles in seconds
    comps = [component("squeezenet1_1", [3, 5]), component("squeezenet1_1", [9, 1], seed=1)]
    asm = assemble(comps, Calibration.scaling([torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0])]),
                   layout=layout)
    example = torch.randn(1, *comps[0].input_shape[1:])
    for name, model, meta in [("component", comps[1].module, comps[1].metadata),
                              ("assembled", asm.module, asm.metadata)]:
        report = export_onnx(model, tmp_path / f"{name}.onnx", example, metadata=meta)
        assert max(report.max_abs_err.values()) <= 1e-4 * 10  # parity is checked inside too
        assert read_onnx_metadata(tmp_path / f"{name}.onnx")["class_names"] == meta["class_names"]
        save_model(model, tmp_path / f"{name}.mdafx", meta, example)
        loaded = load_model(tmp_path / f"{name}.mdafx")
        x = torch.randn(3, *example.shape[1:])
        with torch.no_grad():
            assert torch.equal(loaded.module(x), model(x))
        assert loaded.metadata["class_names"] == meta["class_names"]


def test_merged_layout_from_files_alone(tmp_path):
    """Component files hold module-level graphs: the merged layout needs nothing else (no
    source model, no weights), and equals the parallel layout of the same files."""
    comps = [component("resnet18", [3, 5]), component("resnet18", [9, 1, 0], seed=1)]
    paths = [tmp_path / "a.mdafx", tmp_path / "b.mdafx"]
    for comp, path in zip(comps, paths):
        api.save(comp, path)
    del comps
    loaded = [api.load_component(p) for p in paths]
    scales = [torch.tensor([0.5, 2.0]), torch.tensor([1.0, 3.0, 0.25])]
    merged = assemble(loaded, Calibration.scaling(scales), layout="merged")
    parallel = assemble(loaded, Calibration.scaling(scales), layout="parallel")
    x = torch.randn(2, *loaded[0].input_shape[1:])
    with torch.no_grad():
        a, b = merged(x), parallel(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    names = {n.target for n in merged.module.graph.nodes if n.op == "call_module"}
    assert names and all(t.startswith("merged.") for t in names)  # the branches are gone
