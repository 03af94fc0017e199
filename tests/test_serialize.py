"""mdafx.serialize: exact round trips, metadata, atomic writes, and refusing bad files safely."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

from mdafx import serialize
from mdafx.errors import ExportError, FormatError
from mdafx.serialize import (FORMAT_VERSION, lift_batch_norms, load_model, mdafx_version,
                             save_model)


class TinyNet(nn.Module):
    """Residual add, concat, view(size(0), -1), a constant and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.register_buffer("gain", torch.full((16,), 0.5), persistent=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, x + self.branch(x)], dim=1)
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1) * self.gain
        return self.fc(nn.functional.gelu(x, approximate="tanh"))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x).mean(dim=(2, 3))
        return self.a(h), self.b(h)


def tiny_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8,
                                       bn_size=2, num_classes=10)


def tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


ZOO = {
    "tiny_net": TinyNet,
    "two_heads": TwoHeads,
    "tiny_resnet": tiny_resnet,
    "tiny_densenet": tiny_densenet,
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(
        num_classes=10, aux_logits=False, init_weights=True),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}
SLOW = {"squeezenet1_1", "resnet18", "googlenet", "densenet121"}
SIZE = 32


def traced(name: str) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    # Non-trivial batch-norm statistics, so a lost buffer would show in the outputs.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return torch.fx.symbolic_trace(model)


def example(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def outputs(out: object) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "tiny.mdafx"
    save_model(traced("tiny_net"), path, {"classes": ["a", "b", "c", "d", "e"]}, example())
    return path


def rewrite_entries(src: Path, dst: Path, **replace: bytes) -> None:
    """Copy the zip at ``src`` to ``dst`` with some entries replaced (``.`` spelt ``_``)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, replace.get(name.replace(".", "_"), zin.read(name)))


# ---------------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ZOO])
def test_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    gm = traced(name)
    path = save_model(gm, tmp_path / f"{name}.mdafx", {"model": name}, example())
    loaded = load_model(path)
    with torch.no_grad():
        for batch in (1, 3):
            x = example(batch)
            want, got = outputs(gm(x)), outputs(loaded(x))
            assert len(want) == len(got)
            for w, g in zip(want, got):
                assert g.shape == w.shape and torch.equal(g, w), (name, batch)
    assert loaded.module.state_dict().keys() == gm.state_dict().keys()
    assert type(loaded(example())) is type(gm(example()))


def test_metadata_is_kept(tmp_path: Path) -> None:
    metadata = {
        "classes": [{"index": 0, "name": "cat"}, {"index": 1, "name": "dog"}],
        "sources": [{"model": "resnet18", "task": "cifar10", "classes": [3, 5]}],
        "input": {"size": [SIZE, SIZE], "channels": 3, "mean": [0.49, 0.48, 0.45],
                  "std": [0.25, 0.24, 0.26]},
        "scale": [0.125, 0.0625],
        "note": "ünïcode ok",
    }
    path = save_model(traced("tiny_net"), tmp_path / "m.mdafx", metadata, example())
    loaded = load_model(path)
    assert loaded.metadata == {**metadata, "format_version": FORMAT_VERSION,
                               "mdafx_version": mdafx_version()}
    assert loaded.input_shape == (None, 3, SIZE, SIZE) and loaded.input_dtype == torch.float32


def test_load_needs_no_source_class(tmp_path: Path) -> None:
    module = types.ModuleType("mdafx_test_throwaway")
    exec("import torch\nclass Gone(torch.nn.Module):\n"
         "    def __init__(self):\n        super().__init__(); self.l = torch.nn.Linear(4, 2)\n"
         "    def forward(self, x):\n        return self.l(x).relu()\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        model = module.Gone().eval()
        path = save_model(model, tmp_path / "gone.mdafx", {}, torch.randn(1, 4))
        x = torch.randn(3, 4)
        want = model(x)
    finally:
        del sys.modules[module.__name__]
    del module, model
    assert torch.equal(load_model(path)(x), want)


def test_training_flag_is_restored_and_eval_graph_saved(tmp_path: Path) -> None:
    gm = traced("tiny_net").train()
    path = save_model(gm, tmp_path / "m.mdafx", {}, example())
    assert gm.training
    x = example(3)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), gm.eval()(x))


def test_input_spec_is_checked(saved_tiny: Path) -> None:
    loaded = load_model(saved_tiny)
    with pytest.raises(ValueError, match="input spec"):
        loaded(torch.randn(2, 3, SIZE + 1, SIZE))
    with pytest.raises(ValueError, match="input spec"):
        loaded(torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64))


@pytest.mark.parametrize("metadata, error", [
    ({"format_version": 9}, ValueError),
    ({"x": object()}, ValueError),
    ({"x": float("nan")}, ValueError),
    ({1: "int key"}, TypeError),
])
def test_bad_metadata_is_refused_before_writing(metadata: dict, error: type,
                                                tmp_path: Path) -> None:
    with pytest.raises(error):
        save_model(traced("two_heads"), tmp_path / "m.mdafx", metadata, example())
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ atomic writes

def fail_mid_write(monkeypatch: pytest.MonkeyPatch, directory: Path) -> list[list[str]]:
    """Make graph encoding raise at its 5th node; record the directory listing at that time."""
    seen: list[list[str]] = []
    calls = []
    real = serialize._encode_node

    def encode(node: torch.fx.Node) -> dict:
        calls.append(node.name)
        if len(calls) == 5:
            seen.append(sorted(os.listdir(directory)))
            raise RuntimeError("disk on fire")
        return real(node)

    monkeypatch.setattr(serialize, "_encode_node", encode)
    return seen


def test_failed_write_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = fail_mid_write(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(traced("tiny_net"), tmp_path / "m.mdafx", {}, example())
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].endswith(".tmp")  # mid-write
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         saved_tiny: Path) -> None:
    path = tmp_path / "m.mdafx"
    path.write_bytes(saved_tiny.read_bytes())
    fail_mid_write(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError):
        save_model(traced("tiny_net"), path, {}, example(), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.mdafx"]
    assert path.read_bytes() == saved_tiny.read_bytes()


def test_failed_round_trip_check_leaves_no_file(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setattr(serialize, "_flat_outputs", lambda out: [torch.rand(1)])
    with pytest.raises(ExportError, match="does not reproduce"):
        save_model(traced("two_heads"), tmp_path / "m.mdafx", {}, example())
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_refused_unless_asked(tmp_path: Path, saved_tiny: Path) -> None:
    path = tmp_path / "m.mdafx"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(traced("two_heads"), path, {}, example())
    assert path.read_bytes() == b"precious"
    save_model(traced("two_heads"), path, {"v": 2}, example(), overwrite=True)
    assert load_model(path).metadata["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m.mdafx"]


def test_unexportable_model_raises_export_error(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x > 0].sum().reshape(1).expand(x.shape[0]) if x.sum() > 0 else x

    with pytest.raises(ExportError, match="torch.export failed for DataDependent"):
        save_model(DataDependent(), tmp_path / "m.mdafx", {}, torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("mdafx_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_non_aten_op_is_refused_at_save(tmp_path: Path) -> None:
    class UsesCustomOp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return twice(x)

    with pytest.raises(ExportError, match="mdafx_test.twice.* cannot be stored"):
        save_model(UsesCustomOp(), tmp_path / "m.mdafx", {}, torch.randn(2, 3))
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- bad files

def test_newer_format_version_is_refused(tmp_path: Path, saved_tiny: Path) -> None:
    with zipfile.ZipFile(saved_tiny) as zf:
        header = json.loads(zf.read("mdafx.json"))
    header.update(format_version=FORMAT_VERSION + 1, mdafx_version="9.9.9")
    future = tmp_path / "future.mdafx"
    rewrite_entries(saved_tiny, future, mdafx_json=json.dumps(header).encode())
    message = (f"written by mdafx 9.9.9, format v{FORMAT_VERSION + 1}; this mdafx .* reads up "
               f"to v{FORMAT_VERSION}; upgrade mdafx")
    with pytest.raises(FormatError, match=message) as info:
        load_model(future)
    assert str(future) in str(info.value)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -22, -1])
def test_truncated_file_is_refused(keep: float, tmp_path: Path, saved_tiny: Path) -> None:
    data = saved_tiny.read_bytes()
    cut = tmp_path / "cut.mdafx"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(FormatError, match=str(cut)):
        load_model(cut)


def test_corrupted_tensor_bytes_are_refused(tmp_path: Path, saved_tiny: Path) -> None:
    data = bytearray(saved_tiny.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensors.bin; the zip CRC catches it
    bad = tmp_path / "bad.mdafx"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=str(bad)):
        load_model(bad)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.mdafx")


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def add_entry(src: Path, dst: Path, name: str, data: bytes) -> None:
    rewrite_entries(src, dst)
    with zipfile.ZipFile(dst, "a") as zf:
        zf.writestr(name, data)


def tamper_graph(saved: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(saved) as zf:
        graph = json.loads(zf.read("graph.json"))
    edit(graph)
    rewrite_entries(saved, dst, graph_json=json.dumps(graph).encode())


def first_call(graph: dict) -> dict:
    return next(n for n in graph["nodes"] if n["op"] == "call_function")


def set_target(target: str, args: list) -> object:
    def edit(graph: dict) -> None:
        node = first_call(graph)
        node["target"], node["args"], node["kwargs"] = target, args, {}
    return edit


MALICIOUS = {
    # pickles, in every place a pickle-based loader would look
    "pickled_tensors": lambda saved, dst, payload: rewrite_entries(
        saved, dst, tensors_bin=payload),
    "pickled_graph": lambda saved, dst, payload: rewrite_entries(saved, dst, graph_json=payload),
    "pickled_header": lambda saved, dst, payload: rewrite_entries(saved, dst, mdafx_json=payload),
    "extra_data_pkl": lambda saved, dst, payload: add_entry(saved, dst, "data.pkl", payload),
    "torch_save_file": lambda saved, dst, payload: dst.write_bytes(payload),
    # graphs that would run code when fx builds or runs them
    "os_system_target": lambda saved, dst, payload: tamper_graph(
        saved, dst, set_target("os.system", ["touch MARKER"])),
    "torch_os_system_target": lambda saved, dst, payload: tamper_graph(
        saved, dst, set_target("torch.os.system", ["touch MARKER"])),
    "aten_save_op": lambda saved, dst, payload: tamper_graph(
        saved, dst, set_target("aten.save.default", [{"$node": "x"}, "MARKER"])),
    "aten_from_file_op": lambda saved, dst, payload: tamper_graph(
        saved, dst, set_target("aten.from_file.default", ["MARKER", True, 4])),
    "code_in_node_name": lambda saved, dst, payload: tamper_graph(
        saved, dst, lambda g: first_call(g).update(name="x = __import__('os').system('touch M')")),
    "code_in_attr_path": lambda saved, dst, payload: tamper_graph(
        saved, dst, lambda g: next(n for n in g["nodes"] if n["op"] == "get_attr").update(
            target='stem")+__import__("os").system("touch M")+getattr(self, "x')),
    "code_in_string_literal": lambda saved, dst, payload: tamper_graph(
        saved, dst, lambda g: first_call(g)["args"].append("'); import os; os.system('x")),
    "pickle_as_dtype": lambda saved, dst, payload: tamper_graph(
        saved, dst, lambda g: first_call(g)["args"].append({"$dtype": "os.system"})),
}


@pytest.mark.parametrize("attack", sorted(MALICIOUS))
def test_malicious_file_is_refused_without_running_payload(attack: str, tmp_path: Path,
                                                           saved_tiny: Path) -> None:
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Payload(marker))
    if attack == "torch_save_file":
        import io
        buffer = io.BytesIO()
        torch.save({"model": Payload(marker)}, buffer)
        payload = buffer.getvalue()
    evil = tmp_path / "evil.mdafx"
    MALICIOUS[attack](saved_tiny, evil, payload)
    with pytest.raises(FormatError, match=str(evil)):
        load_model(evil)
    assert not marker.exists()
    # The payload is live: a plain unpickle would have run it.
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_crafted_torch_export_archive_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    ep = torch.export.export(nn.Linear(4, 2), (torch.randn(2, 4),))
    pt2 = tmp_path / "model.pt2"
    torch.export.save(ep, pt2)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(pt2) as zin, zipfile.ZipFile(evil, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(config).encode()
            elif "/data/weights/weight_" in name:
                data = pickle.dumps(Payload(marker))
            zout.writestr(name, data)
    with pytest.raises(FormatError, match="not an mdafx model file"):
        load_model(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------- trainable norms

@pytest.mark.parametrize("name", ["tiny_net", "tiny_resnet"])
def test_lifted_batch_norms_train_like_the_source(name: str, tmp_path: Path) -> None:
    """lift_batch_norms: eval output and state_dict unchanged; in train mode the loaded model
    normalises with batch statistics and updates the running ones exactly as the source module
    does; saved again, it round-trips."""
    source = traced(name)
    path = tmp_path / "m.mdafx"
    save_model(source, path, {}, example())
    module = load_model(path).module
    keys = {k: v.clone() for k, v in module.state_dict().items()}
    x = example(4)
    with torch.no_grad():
        want_eval = module(x)
    lifted = lift_batch_norms(module)
    norms = [n for n, m in source.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(lifted) == sorted(norms)
    with torch.no_grad():
        torch.testing.assert_close(module(x), want_eval, rtol=0, atol=0)
        assert set(module.state_dict()) == set(keys)
        module.train(), source.train()
        torch.testing.assert_close(module(x), source(x))
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, source.state_dict()[k])   # running stats moved alike
        assert any(not torch.equal(module.state_dict()[k], keys[k]) for k in keys)
    module.eval()
    again = tmp_path / "again.mdafx"
    save_model(module, again, {}, example())
    with torch.no_grad():
        torch.testing.assert_close(load_model(again).module(x), module(x))


def test_lift_leaves_shared_or_foreign_norm_tensors_alone(saved_tiny: Path) -> None:
    module = load_model(saved_tiny).module
    for node in module.graph.nodes:  # make the norm's weight a tensor another node reads too
        if node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default:
            weight = node.args[1]
            with module.graph.inserting_after(node):
                extra = module.graph.call_function(torch.ops.aten.mul.Tensor, (weight, 1.0))
            break
    before = str(module.graph)
    assert lift_batch_norms(module) == [] and str(module.graph) == before
    assert extra in module.graph.nodes
