"""mdafx.modelfile (format v2): bit-exact round trips of module-level graphs, real layers after
loading, and crafted files refused with a FormatError before anything runs or is allocated."""
from __future__ import annotations

import json
import operator
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import mdafx
from mdafx import ir, modelfile
from mdafx.errors import ExportError, FormatError, OutputError, PreconditionError
from mdafx.modelfile import FORMAT_VERSION, load_model, save_model
from mdafx.rules import REGISTRY, storage

SIZE = 8  # input H = W of the small nets


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so batch norms are not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(8 * (SIZE // 2) ** 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(self.pool(x).flatten(1))


def _example(size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _traced(model: nn.Module, size: int = SIZE) -> fx.GraphModule:
    torch.manual_seed(0)
    return ir.trace(_randomize_norms(model), _example(size))


def _scaled_net() -> fx.GraphModule:
    """TinyNet with per-class factors multiplied into the logits from a get_attr buffer."""
    gm = _traced(TinyNet())
    gm.register_buffer("mdafx_scale_0_factors", torch.linspace(0.5, 2.0, 5).reshape(1, 5))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        factors = gm.graph.get_attr("mdafx_scale_0_factors")
        scaled = gm.graph.call_function(torch.mul, (out.args[0], factors))
        scaled.name = "mdafx_scale_0"
    out.args = (scaled,)
    gm.recompile()
    return gm


SMALL: dict[str, Callable[[], fx.GraphModule]] = {
    "tiny": lambda: _traced(TinyNet()),
    "residual": lambda: _traced(ResidualNet()),
    "concat": lambda: _traced(ConcatNet()),
    "scaled": _scaled_net,
}
TORCHVISION: dict[str, Callable[[], nn.Module]] = {  # random weights, 32x32 input
    "resnet18": tvm.resnet18,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "densenet121": tvm.densenet121,
    "googlenet": lambda: tvm.googlenet(aux_logits=False, init_weights=False),
    "shufflenet_v2_x0_5": tvm.shufflenet_v2_x0_5,
    "squeezenet1_1": tvm.squeezenet1_1,
    "efficientnet_b0": tvm.efficientnet_b0,
    "convnext_tiny": tvm.convnext_tiny,
    "regnet_x_400mf": tvm.regnet_x_400mf,
    "vgg11_bn": tvm.vgg11_bn,
}
SLOW = {"vgg11_bn"}  # over 5 s: 133M parameters to initialise, write and read back


def _build(name: str) -> fx.GraphModule:
    if name in SMALL:
        return SMALL[name]()
    torch.manual_seed(0)
    return _traced(TORCHVISION[name](), size=32)


def _assert_same_model(source: fx.GraphModule, loaded: fx.GraphModule, x: torch.Tensor) -> None:
    source.eval()
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))
    assert list(loaded.state_dict()) == list(source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert [(n.op, n.name, n.target) for n in loaded.graph.nodes] == [
        (n.op, n.name, n.target) for n in source.graph.nodes]
    for path, module in source.named_modules():
        if type(module) in storage.LAYERS:
            assert type(loaded.get_submodule(path)) is type(module), path


@pytest.mark.parametrize("name", [*SMALL, *(
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in TORCHVISION)])
def test_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    gm = _build(name)
    path = save_model(gm, tmp_path / f"{name}.mdafx", {"name": name})
    loaded = load_model(path)
    size = ir.shape_of(gm.graph.find_nodes(op="placeholder")[0])[-1]
    _assert_same_model(gm, loaded.module, torch.randn(3, 3, size, size))
    assert loaded.input_shape == (None, 3, size, size) and loaded.input_dtype == torch.float32
    ir.propagate_shapes(gm, torch.zeros(1, 3, size, size))  # load fills shapes for a batch of 1
    assert [ir.shape_of(n) for n in loaded.module.graph.nodes] == [
        ir.shape_of(n) for n in gm.graph.nodes]


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[fx.GraphModule, Path]:
    gm = _traced(TinyNet())
    return gm, save_model(gm, tmp_path / "tiny.mdafx", {"classes": ["cat", "dog"], "n": 2})


def test_loaded_layers_are_real_and_train(tiny: tuple[fx.GraphModule, Path]) -> None:
    gm, path = tiny
    module = load_model(path).module
    assert isinstance(module.get_submodule("features.0"), nn.Conv2d)
    assert isinstance(module.get_submodule("features.1"), nn.BatchNorm2d)
    assert isinstance(module.get_submodule("classifier"), nn.Linear)
    assert not module.training
    bn = module.get_submodule("features.1")
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        eval_out = module(x)
    module.train()
    train_out = module(x)
    train_out.sum().backward()
    assert not torch.equal(bn.running_mean, before)  # batch statistics were used and tracked
    assert not torch.equal(train_out.detach(), eval_out)
    assert module.get_submodule("features.0").weight.grad is not None


def test_file_is_plain_safetensors_with_the_state_dict(tiny: tuple[fx.GraphModule, Path]) -> None:
    gm, path = tiny
    tensors = safetensors.torch.load_file(path)
    assert set(tensors) == set(gm.state_dict())
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mdafx-model" and meta["format_version"] == "2"
    assert meta["mdafx_version"] == mdafx.__version__
    graph = json.loads(meta["graph"])
    assert graph["input"] == {"shape": [None, 3, SIZE, SIZE], "dtype": "float32"}
    assert graph["layers"]["features.0"]["type"] == "Conv2d"
    assert graph["layers"]["features.0"]["args"]["bias"] is True


def test_metadata_round_trips_with_versions(tiny: tuple[fx.GraphModule, Path]) -> None:
    _, path = tiny
    assert load_model(path).metadata == {"classes": ["cat", "dog"], "n": 2,
                                         "format_version": FORMAT_VERSION,
                                         "mdafx_version": mdafx.__version__}


def test_non_persistent_buffer_and_frozen_parameter_keep_their_kind(tmp_path: Path) -> None:
    gm = _traced(TinyNet())
    gm.register_buffer("gain", torch.full((1, 5), 0.5), persistent=False)
    gm.get_submodule("classifier").bias.requires_grad_(False)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gain = gm.graph.get_attr("gain")
        out.args = (gm.graph.call_method("mul", (out.args[0], gain)),)
    gm.recompile()
    loaded = load_model(save_model(gm, tmp_path / "m.mdafx", {})).module
    assert "gain" not in loaded.state_dict() and "gain" in dict(loaded.named_buffers())
    assert not loaded.get_submodule("classifier").bias.requires_grad
    assert loaded.get_submodule("classifier").weight.requires_grad


# One instance of every storable layer type, with non-default arguments where they exist.
LAYER_ZOO = [
    nn.Conv1d(3, 4, 3, stride=2, bias=False), nn.Conv2d(4, 8, (3, 1), padding="same", groups=2),
    nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), nn.Linear(3, 4, bias=False),
    nn.BatchNorm1d(4, momentum=None), nn.BatchNorm2d(4, eps=1e-3, affine=False),
    nn.LayerNorm((4, 5), bias=False), nn.GroupNorm(2, 4), nn.LocalResponseNorm(3, alpha=1e-3),
    nn.ReLU(inplace=True), nn.ReLU6(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(),
    nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(), nn.ELU(0.5), nn.LeakyReLU(0.2), nn.Hardtanh(-2, 2),
    nn.Mish(), nn.CELU(0.7), nn.SELU(), nn.Softplus(2, 10), nn.Softmax(dim=1), nn.LogSoftmax(1),
    nn.Dropout(0.3), nn.Dropout1d(), nn.Dropout2d(), nn.Dropout3d(), nn.AlphaDropout(),
    nn.FeatureAlphaDropout(), nn.Identity(), nn.MaxPool1d(2), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
    nn.AvgPool1d(2), nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool1d(2),
    nn.AdaptiveAvgPool2d((None, 7)), nn.AdaptiveMaxPool2d(1),
    nn.Upsample(scale_factor=2.0, mode="bilinear"), nn.Flatten(0, -1), nn.Unflatten(1, (2, 2)),
    nn.ZeroPad2d((1, 2, 0, 1)), nn.ConstantPad2d(1, 0.5), nn.ZeroPad1d((0, 2)),
    nn.ConstantPad1d(1, -0.25), nn.ReflectionPad1d(1), nn.ReflectionPad2d((1, 0, 2, 1)),
    nn.ReplicationPad1d((2, 1)), nn.ReplicationPad2d(1), nn.CircularPad2d((0, 1, 1, 0)),
    nn.PReLU(4, init=0.1), nn.RMSNorm([4, 3], eps=None), nn.RMSNorm(6, eps=1e-5,
                                                                     elementwise_affine=False),
    nn.MultiheadAttention(8, 2, add_bias_kv=True, kdim=4, vdim=6, batch_first=True),
]


def test_every_storable_layer_type_round_trips(tmp_path: Path) -> None:
    assert {type(m) for m in LAYER_ZOO} == set(storage.LAYERS)
    gm = _traced(TinyNet())
    for i, layer in enumerate(LAYER_ZOO):  # stored even though the graph does not call them
        gm.add_module(f"zoo{i}", layer)
    loaded = load_model(save_model(gm, tmp_path / "zoo.mdafx", {})).module
    assert list(loaded.state_dict()) == list(gm.state_dict())
    for i, layer in enumerate(LAYER_ZOO):
        got = loaded.get_submodule(f"zoo{i}")
        spec = storage.LAYERS[type(layer)]
        assert type(got) is type(layer) and spec.read_args(got) == spec.read_args(layer)
        for name, t in layer.state_dict().items():
            assert torch.equal(got.state_dict()[name], t), (i, name)


def test_tables_cover_every_channel_rule_and_name_each_function_once() -> None:
    for key in REGISTRY.rules:
        if isinstance(key, str):
            assert key in storage.METHODS, key
        elif isinstance(key, type):
            assert key in storage.LAYERS, key
        else:
            assert key in storage.FUNCTION_NAMES, key
    assert len(storage.FUNCTION_NAMES) == len(storage.FUNCTIONS)
    assert storage.FUNCTION_NAMES[F.relu_] == storage.FUNCTION_NAMES[torch.relu_] == "torch.relu_"
    assert storage.FUNCTION_NAMES[torch.conv2d] == "torch.nn.functional.conv2d"
    assert storage.FUNCTIONS["operator.getitem"] is operator.getitem


# --------------------------------------------------------------------------------------------
# save_model refusals
# --------------------------------------------------------------------------------------------

class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class WithCustomLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.doubler = Doubler()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.doubler(self.conv(x))


def test_save_refuses_unknown_layer_type(tmp_path: Path) -> None:
    gm = ir.trace(WithCustomLeaf(), _example(), leaf_modules=[Doubler])
    with pytest.raises(ExportError, match=r"node doubler .*layer 'doubler' is a .*Doubler.*LAYERS"):
        save_model(gm, tmp_path / "m.mdafx", {})
    assert not list(tmp_path.iterdir())


def test_save_refuses_unknown_function_and_get_attr_of_a_module(tmp_path: Path) -> None:
    gm = _traced(TinyNet())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (gm.graph.call_function(torch.cumsum, (out.args[0], 1)),)
    gm.recompile()
    with pytest.raises(ExportError, match="cumsum.*FUNCTIONS"):
        save_model(gm, tmp_path / "a.mdafx", {})
    gm = _traced(TinyNet())
    with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):
        gm.graph.get_attr("features")
    with pytest.raises(ExportError, match="get_attr 'features' is a Module, not a tensor"):
        save_model(gm, tmp_path / "b.mdafx", {})


def test_save_refuses_in_place_op_on_a_parameter(tmp_path: Path) -> None:
    gm = _traced(TinyNet())
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        bias = gm.graph.get_attr("classifier.bias")
        view = gm.graph.call_method("view", (bias, -1))
        gm.graph.call_method("add_", (view, 1.0))
    gm.recompile()
    with pytest.raises(ExportError, match="in place into a parameter"):
        save_model(gm, tmp_path / "m.mdafx", {})


def test_save_needs_shapes_or_an_example(tmp_path: Path) -> None:
    gm = fx.symbolic_trace(TinyNet().eval())
    with pytest.raises(ExportError, match="no shape"):
        save_model(gm, tmp_path / "a.mdafx", {})
    loaded = load_model(save_model(gm, tmp_path / "b.mdafx", {}, _example()))
    assert loaded.input_shape == (None, 3, SIZE, SIZE)


@pytest.mark.parametrize("metadata, error", [
    ({"format_version": 3}, PreconditionError), ({"x": object()}, PreconditionError),
    ({"x": float("nan")}, PreconditionError), ({1: "a"}, PreconditionError)])
def test_bad_metadata_is_refused(metadata: dict, error: type, tmp_path: Path) -> None:
    with pytest.raises(error):
        save_model(_traced(TinyNet()), tmp_path / "m.mdafx", metadata)
    assert not list(tmp_path.iterdir())


def test_failed_check_writes_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(modelfile, "_same_outputs", lambda want, got: False)
    with pytest.raises(ExportError, match="bit for bit"):
        save_model(_traced(TinyNet()), tmp_path / "m.mdafx", {})
    assert not list(tmp_path.iterdir())


def test_existing_file_is_kept_unless_overwrite(tiny: tuple[fx.GraphModule, Path]) -> None:
    gm, path = tiny
    with pytest.raises(OutputError):
        save_model(gm, path, {})
    save_model(gm, path, {"new": True}, overwrite=True)
    assert load_model(path).metadata["new"] is True


# --------------------------------------------------------------------------------------------
# load_model refusals
# --------------------------------------------------------------------------------------------

def _parts(path: Path) -> tuple[dict[str, str], dict, dict[str, torch.Tensor]]:
    with safetensors.safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return meta, json.loads(meta["graph"]), tensors


def _crafted(path: Path, edit: Callable[[dict, dict, dict], None]) -> Path:
    """A copy of ``path`` with ``edit(graph, tensors, metadata)`` applied."""
    meta, graph, tensors = _parts(path)
    edit(graph, tensors, meta)
    meta["graph"] = json.dumps(graph)
    out = path.with_name(f"crafted-{uuid.uuid4().hex[:8]}.mdafx")
    safetensors.torch.save_file(tensors, out, metadata=meta)
    return out


def _refused(path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(FormatError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _insert_node(graph: dict, node: dict) -> None:
    graph["nodes"].insert(1, node)  # right after the placeholder


def _node(op: str, target: str, *args, name: str = "pwn") -> dict:
    return {"op": op, "name": name, "target": target, "args": list(args)}


X = {"$node": "x"}


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    """A file that a payload would create; it must never exist."""
    path = tmp_path / f"pwned-{uuid.uuid4().hex}"
    yield path
    assert not path.exists(), "a crafted file ran code"


@pytest.mark.parametrize("layer_type", ["os.system", "Conv2dX", "builtins.eval"])
def test_unknown_layer_type_is_refused(layer_type: str, tiny, marker: Path) -> None:
    def edit(graph, tensors, meta):
        graph["layers"]["features.2"] = {"type": layer_type, "args": {"command": f"touch {marker}"}}

    _refused(_crafted(tiny[1], edit), "layer 'features.2'", "unknown layer type", layer_type)


@pytest.mark.parametrize("target", ["os.system", "subprocess.getoutput", "builtins.eval",
                                    "torch.load", "builtins.__import__"])
def test_unknown_call_target_is_refused(target: str, tiny, marker: Path) -> None:
    crafted = _crafted(tiny[1], lambda g, t, m: _insert_node(
        g, _node("call_function", target, f"touch {marker}")))
    _refused(crafted, "node pwn", repr(target), "FUNCTIONS")


def test_unknown_method_is_refused(tiny, marker: Path) -> None:
    crafted = _crafted(tiny[1], lambda g, t, m: _insert_node(
        g, _node("call_method", "__reduce__", X)))
    _refused(crafted, "node pwn", "'__reduce__'", "METHODS")


@pytest.mark.parametrize("attribute", ["__class__", "T", "touch /tmp/x"])
def test_getattr_reads_only_shape_like_attributes(attribute: str, tiny, marker: Path) -> None:
    crafted = _crafted(tiny[1], lambda g, t, m: _insert_node(
        g, _node("call_function", "builtins.getattr", X, attribute)))
    _refused(crafted, "node pwn")


@pytest.mark.parametrize("name", [
    'x"); __import__("os").system("touch MARKER"); ("', "a\nb", "a'b", "def", "self",
    "__import__('os').system('touch MARKER')", "", "é"])
def test_bad_node_names_are_refused(name: str, tiny, marker: Path) -> None:
    name = name.replace("MARKER", str(marker))
    crafted = _crafted(tiny[1], lambda g, t, m: _insert_node(
        g, _node("call_method", "size", X, name=name)))
    _refused(crafted, "name")


def test_bad_attribute_path_is_refused(tiny, marker: Path) -> None:
    def edit(graph, tensors, meta):
        evil = f'w"); __import__("os").system("touch {marker}"); ("'
        tensors[evil] = torch.zeros(1)
        graph["tensors"][evil] = {"kind": "buffer", "persistent": True, "requires_grad": False}

    _refused(_crafted(tiny[1], edit), "invalid attribute path")


def test_reference_to_a_later_node_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        graph["nodes"][1]["args"][0] = {"$node": graph["nodes"][-2]["name"]}

    _refused(_crafted(tiny[1], edit), "not an earlier node")


def test_in_place_write_into_a_parameter_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        graph["nodes"].insert(1, {"op": "get_attr", "name": "w", "target": "classifier.bias"})
        graph["nodes"].insert(2, _node("call_method", "add_", {"$node": "w"}, 1.0))

    _refused(_crafted(tiny[1], edit), "node pwn writes in place")


def test_weight_that_does_not_fit_its_layer_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        tensors["features.0.weight"] = torch.zeros(8, 4, 3, 3)

    _refused(_crafted(tiny[1], edit), "'features.0.weight'", "layer 'features.0' (Conv2d)",
             "[8, 3, 3, 3]")


def test_layer_arguments_of_the_wrong_kind_are_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        graph["layers"]["features.0"]["args"]["in_channels"] = "3"

    _refused(_crafted(tiny[1], edit), "layer 'features.0'", "in_channels='3'")


def test_missing_and_extra_tensors_are_refused(tiny) -> None:
    def drop(graph, tensors, meta):
        del tensors["features.1.running_var"], graph["tensors"]["features.1.running_var"]

    def add(graph, tensors, meta):
        tensors["features.0.extra"] = torch.zeros(2)
        graph["tensors"]["features.0.extra"] = dict(graph["tensors"]["features.0.bias"])

    def only_in_file(graph, tensors, meta):
        tensors["stray"] = torch.zeros(2)

    _refused(_crafted(tiny[1], drop), "'features.1.running_var'", "missing")
    _refused(_crafted(tiny[1], add), "'features.0.extra' is extra")
    _refused(_crafted(tiny[1], only_in_file), "differ", "stray")


def _add_tensor(name: str, tensor: torch.Tensor, kind: str = "buffer", grad: bool = False):
    def edit(graph, tensors, meta):
        tensors[name] = tensor
        graph["tensors"][name] = {"kind": kind, "persistent": True, "requires_grad": grad}
    return edit


RELU = {"type": "ReLU", "args": {"inplace": False}}


@pytest.mark.parametrize("edit, fragment", [
    (lambda g, t, m: g["layers"].__setitem__("graph", RELU), "'graph' collides"),
    (lambda g, t, m: g["layers"].__setitem__("features.0.sub", RELU), "inside another layer"),
    (_add_tensor("training", torch.zeros(1)), "'training' cannot be registered"),
    (_add_tensor("features", torch.zeros(1)), "'features' collides with a module path"),
    (_add_tensor("p", torch.zeros(1, dtype=torch.int64), "parameter", True), "'p'"),
    (lambda g, t, m: g["nodes"][1].__setitem__("kwargs", {"k": json.loads("[" * 40 + "]" * 40)}),
     "nested deeper"),
    (lambda g, t, m: g["nodes"][1].__setitem__("kwargs", {"lambda": 1}), "'lambda'"),
    (lambda g, t, m: g["nodes"][1].__setitem__("args", [X, {"$device": "cpu'); import os"}]),
     "invalid argument"),
    (lambda g, t, m: g["nodes"].insert(1, {"op": "placeholder", "name": "y"}), "placeholder"),
    (lambda g, t, m: _insert_node(g, _node("call_eval", "x")), "unknown op"),
    (lambda g, t, m: g["nodes"].pop(), "no output node"),
    (lambda g, t, m: g["tensors"]["features.0.weight"].__setitem__("kind", "buffer"), "bad info"),
    (lambda g, t, m: g["layers"]["features.1"]["args"].__setitem__("eps", "1e-5"), "eps='1e-5'"),
    (lambda g, t, m: g["layers"]["features.0"]["args"].__setitem__("device", "cpu"), "takes"),
    (lambda g, t, m: m.__setitem__("metadata", '{"format_version": 7}'), "reserved keys"),
    (lambda g, t, m: m.__setitem__("extra", "1"), "metadata keys"),
    (lambda g, t, m: m.__setitem__("format_version", "2.0"), "invalid format_version"),
])
def test_malformed_graphs_are_refused(edit: Callable, fragment: str, tiny) -> None:
    _refused(_crafted(tiny[1], edit), fragment)


def test_graph_that_does_not_run_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        graph["layers"]["classifier"]["args"]["in_features"] = 7
        tensors["classifier.weight"] = torch.zeros(5, 7)

    _refused(_crafted(tiny[1], edit), "does not run on an input of shape (1, 3, 8, 8)")


@pytest.mark.parametrize("eighths", range(8))
def test_truncated_file_is_refused(eighths: int, tiny) -> None:
    data = tiny[1].read_bytes()
    cut = tiny[1].with_name("cut.mdafx")
    cut.write_bytes(data[:len(data) * eighths // 8])
    _refused(cut)


def test_header_longer_than_the_file_is_refused(tiny) -> None:
    data = tiny[1].read_bytes()
    bad = tiny[1].with_name("long-header.mdafx")
    bad.write_bytes((len(data) + 10).to_bytes(8, "little") + data[8:])
    _refused(bad, "header declares")


def test_huge_declared_input_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        graph["input"]["shape"] = [None, 3, 60000, 60000]

    _refused(_crafted(tiny[1], edit), "exceeds")


def _lying_file(path: Path, elements: int) -> Path:
    """A few bytes whose header declares a float32 tensor of ``elements`` elements."""
    meta = _parts(path)[0]
    header = {"__metadata__": meta,
              "w": {"dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]}}
    text = json.dumps(header).encode()
    path = path.with_name("lying.mdafx")
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 16)
    return path


def test_huge_declared_tensor_is_refused_before_reading(tiny, monkeypatch) -> None:
    lying = _lying_file(tiny[1], 2**40)
    opened = []
    monkeypatch.setattr(modelfile.safetensors, "safe_open", lambda *a, **k: opened.append(a))
    _refused(lying, "max_bytes")
    _refused(lying, "file holds 16", max_bytes=2**63)  # a raised limit still needs the bytes
    assert not opened


def test_max_bytes_can_be_lowered_and_raised(tiny) -> None:
    _refused(tiny[1], "max_bytes=100", max_bytes=100)
    assert load_model(tiny[1], max_bytes=2**40).input_shape == (None, 3, SIZE, SIZE)


def test_format_v1_zip_is_refused_with_the_remake_message(tmp_path: Path) -> None:
    old = tmp_path / "old.mdafx"
    with zipfile.ZipFile(old, "w") as zf:
        zf.writestr("mdafx.json", json.dumps({"format": "mdafx-model", "format_version": 1}))
    _refused(old, "format v1", "no longer reads", "`mdafx disassemble` / `mdafx assemble`")


def test_newer_format_version_is_refused(tiny) -> None:
    def edit(graph, tensors, meta):
        meta["format_version"] = "99"

    _refused(_crafted(tiny[1], edit), "format v99", "upgrade mdafx")


def test_other_files_are_not_mdafx_model_files(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain, metadata={"format": "pt"})
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.mdafx"
    empty.write_bytes(b"")
    for path in (plain, noise, empty):
        _refused(path, "not an mdafx model file")


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.mdafx")
