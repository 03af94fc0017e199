"""The mdafx command line (mdafx/cli/), end to end.

The happy path runs once as a chain (``pipeline``) through the real console script (``mdafx``,
or ``python -m mdafx.cli`` where the script is not installed) on a 3-class tiny_cnn and a tiny
ImageFolder written here; each test checks one step of it. Everything else calls
``mdafx.cli.main`` in this process (same code, same exit codes, no 4 s import per case).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdafx import api, cli
from mdafx.data import ArrayDataset
from mdafx.evaluation import predict
from mdafx.models import tiny_cnn
from mdafx.training import train_classifier

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")
SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
FMT = {"size": [SIZE, SIZE], "channels": 3, "mean": list(MEAN), "std": list(STD)}
NORM = ["--input-size", str(SIZE), "--mean", "0.5", "--std", "0.25"]
LAYERS = {"features_0": 3, "features_4": 16, "features_8": 32, "fc": 32}  # tiny_cnn inputs
MODEL = ["--model", "tiny_cnn", "--weights", "weights.pt"]
PROFILE = "profile.safetensors"

USER_MODELS = '''
import sys
from pathlib import Path

from torch import nn


def small(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))


def exits(num_classes=3):
    sys.exit(0)


def touches(num_classes=3):
    Path("built.marker").write_text("the factory ran")
    return small(num_classes)


class Untraceable(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x.relu()
        return self.fc(x.mean((2, 3)))
'''


# ----------------------------------------------------------------------------- helpers

def images(per_class: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Class c: colour channel c bright, the others dim, plus noise (easy to learn)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 90, (per_class * len(CLASSES), size, size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(len(CLASSES)), per_class)
    x[np.arange(len(y)), :, :, y] += 150
    return x, y


def write_imagefolder(root: Path, x: np.ndarray, y: np.ndarray, names=CLASSES) -> Path:
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def edited_model_file(src: Path, dst: Path, metadata=None, header=None) -> Path:
    """A copy of the model file ``src`` whose user metadata (the JSON in the safetensors header's
    ``__metadata__["metadata"]``) or ``__metadata__`` itself the callables changed in place."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    if metadata is not None:
        meta = json.loads(head["__metadata__"]["metadata"])
        metadata(meta)
        head["__metadata__"]["metadata"] = json.dumps(meta)
    if header is not None:
        header(head["__metadata__"])
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return dst


def script() -> list[str]:
    exe = shutil.which("mdafx")
    return [exe] if exe else [sys.executable, "-m", "mdafx.cli"]


def run(ws: dict, *args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``mdafx ARGS`` in the workspace, through the console script."""
    env = {**os.environ, **ws["env"], **(env_extra or {})}
    return subprocess.run([*script(), *map(str, args)], cwd=ws["dir"], env=env,
                          capture_output=True, text=True, timeout=300)


def call(*args) -> tuple[int, str, str]:
    """``mdafx.cli.main(ARGS)`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def ok(*args) -> str:
    code, out, err = call(*args)
    assert code == 0, f"exit {code}\n{out}\n{err}"
    return out


def expect_error(pattern: str, *args) -> str:
    code, out, err = call(*args)
    assert code == cli.EXIT_ERROR, (out, err)
    assert err.startswith("mdafx: error: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(pattern, err), err
    return err


def script_ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def accuracy_of(module, seed: int, classes=CLASSES) -> tuple[int, int]:
    """(correct, total) of ``module`` on the test images of ``classes`` (logits in that order)."""
    x, y = images(4, seed=seed)
    keep = np.isin(y, [CLASSES.index(c) for c in classes])
    pos = np.asarray([classes.index(CLASSES[v]) for v in y[keep]])
    logits, _ = predict(module, ArrayDataset(x[keep], pos, mean=MEAN, std=STD).batches(64))
    return int((logits.argmax(1) == torch.as_tensor(pos)).sum()), int(keep.sum())


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def ws(tmp_path_factory) -> dict:
    """A trained 3-class tiny_cnn (weights.pt), another one (other.pt), ImageFolder splits,
    a user model module, and the environment the CLI runs in."""
    d = tmp_path_factory.mktemp("cli")
    train = images(6, seed=0)
    write_imagefolder(d / "data" / "train", *train)
    write_imagefolder(d / "data" / "calib", *images(4, seed=1))
    write_imagefolder(d / "data" / "test", *images(4, seed=2))
    torch.manual_seed(0)
    model = tiny_cnn(len(CLASSES))
    train_classifier(model, ArrayDataset(*train, mean=MEAN, std=STD), epochs=15, lr=0.05,
                     batch_size=6, weight_decay=0.0, seed=0, progress=False)
    torch.save(model.state_dict(), d / "weights.pt")
    torch.manual_seed(1)
    torch.save(tiny_cnn(len(CLASSES)).state_dict(), d / "other.pt")
    (d / "usermodels.py").write_text(USER_MODELS)
    env = {"OMP_NUM_THREADS": "1", "MDAFX_CACHE": str(d / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return {"dir": d, "env": env, "model": model.eval()}


@pytest.fixture(autouse=True)
def _in_workspace(request, monkeypatch):
    """In-process calls see the workspace as the current directory and cache."""
    if "ws" in request.fixturenames:
        ws = request.getfixturevalue("ws")
        monkeypatch.chdir(ws["dir"])
        monkeypatch.setenv("MDAFX_CACHE", ws["env"]["MDAFX_CACHE"])


@pytest.fixture(scope="session")
def pipeline(ws) -> dict:
    """The happy path once through the console script, in order; results by step name."""
    fake_bin = ws["dir"] / "bin"
    fake_bin.mkdir()
    dot = fake_bin / "dot"  # a stand-in Graphviz: writes a minimal SVG to the -o file
    dot.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                   'echo "<svg xmlns=\\"http://www.w3.org/2000/svg\\"/>" > "$out"\n')
    dot.chmod(0o755)
    with_dot = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    steps = {
        "analyse": ["analyse", *MODEL, *NORM, "--data", "data/train", "-o", PROFILE],
        "disassemble": ["disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog",
                        "--task", "cat,frog", "--task", "frog,#0", "--alpha-conv", "0.25",
                        "--recipe", "mda", "-o", "components"],
        "assemble": ["assemble", "components/cat-dog.mdafx", "components/frog-cat.mdafx",
                     "--calibrate", "data/calib", "--calibration", "mda", "-o",
                     "assembled.mdafx"],
        "export": ["export", "assembled.mdafx", "--latency"],
        "evaluate": ["evaluate", "assembled.mdafx", "--data", "data/test"],
        "inspect": ["inspect", *MODEL, "--profile", PROFILE, "--task", "dog,frog",
                    "-o", "dumps"],
        "routes": ["routes", *MODEL, "--profile", PROFILE, "--classes", "cat,dog",
                   "-o", "routes.svg"],
        "info": ["--json", "info", "components/frog-cat.mdafx"],
    }
    results = {}
    for name, args in steps.items():
        results[name] = run(ws, *args, env_extra=with_dot if name == "inspect" else None)
    return results


# ----------------------------------------------------------------------------- happy path

def test_help_of_every_command_needs_no_torch(ws):
    commands = [name for name, *_ in cli.COMMANDS] + ["profile"]
    for command in [None, *commands]:
        code, out, _ = call(*([command] if command else []), "--help")
        assert code == 0 and out.startswith("usage: mdafx"), (command, out)
    fallback = subprocess.run([sys.executable, "-m", "mdafx.cli", "--help"], cwd=ws["dir"],
                              env={**os.environ, **ws["env"]}, capture_output=True, text=True)
    assert fallback.returncode == 0 and "disassemble" in fallback.stdout
    probe = ("import sys; from mdafx.cli import main; codes = [main([c, '--help']) for c in "
             f"{commands!r}] + [main(['--help']), main(['analyse'])]; "
             "assert codes == [0] * (len(codes) - 1) + [2], codes; "
             "assert 'torch' not in sys.modules, sorted(sys.modules)")
    light = subprocess.run([sys.executable, "-c", probe], cwd=ws["dir"], capture_output=True,
                           text=True, env={**os.environ, **ws["env"]})
    assert light.returncode == 0, light.stderr


def test_analyse_writes_a_profile_and_prints_counts(ws, pipeline):
    out = script_ok(pipeline["analyse"])
    for name in CLASSES:
        assert re.search(rf"\b{name}\s+6\s+1\s+1\b", out), out  # 6 images, 1 profiled, 1 held
    assert re.search(r"total\s+18\s+3\s+3\b", out) and "4 weighted layers profiled" in out
    prof = api.Profile.load(ws["dir"] / PROFILE)
    assert prof.class_names == list(CLASSES) and len(prof.layers) == 4
    assert prof.record["input"] == FMT
    assert prof.record["source"]["model"] == "tiny_cnn"
    held = prof.record["calibration"]
    assert held["holdout"] == 0.1 and held["images"] == 18 and len(held["indices"]) == 3
    _, y = images(6, seed=0)
    assert sorted(y[held["indices"]].tolist()) == [0, 1, 2]  # one per class


def test_disassemble_writes_one_component_per_task(ws, pipeline):
    out = script_ok(pipeline["disassemble"])
    assert re.search(r"cat,dog\s+0,1\s", out) and re.search(r"frog,cat\s+2,0\s", out), out
    comp = api.load(ws["dir"] / "components" / "frog-cat.mdafx")
    meta = comp.metadata
    assert comp.class_names == ["frog", "cat"] and comp.classes == [2, 0]
    assert meta["input"] == FMT  # taken from the profile
    assert meta["thresholds"]["conv_alpha"] == 0.25 and meta["source"] == "weights"
    assert meta["model"] == "tiny_cnn" and meta["num_classes_source"] == 3
    assert meta["params"] < meta["params_source"]
    assert f"{meta['params']:,} ({meta['params'] / meta['params_source']:.1%})" in out
    assert f"{meta['macs']:,} ({meta['macs'] / meta['macs_source']:.1%})" in out
    assert comp(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 2)


def test_assemble_calibrates_and_prints_the_class_map(ws, pipeline):
    out = script_ok(pipeline["assemble"])
    assert re.search(r"0\s+cat\s+#0 weights\[0\]; #1 weights\[0\]", out), out
    assert re.search(r"2\s+frog\s+#1 weights\[2\]", out), out
    asm = api.load(ws["dir"] / "assembled.mdafx")
    meta = asm.metadata
    assert asm.class_names == ["cat", "dog", "frog"] and asm.layout == "parallel"
    assert meta["calibration"]["samples"] == [8, 8]
    scales = [s for comp in meta["scales"] for s in comp]
    assert all(np.isfinite(scales)) and scales != [1.0] * len(scales)
    # every assembled logit is the scaled logit of its component (cat: the max of both)
    x = torch.randn(3, 3, SIZE, SIZE)
    a, b = (api.load(ws["dir"] / "components" / f) for f in ("cat-dog.mdafx", "frog-cat.mdafx"))
    with torch.no_grad():
        la = a(x) * torch.tensor(meta["scales"][0])
        lb = b(x) * torch.tensor(meta["scales"][1])
        want = torch.stack([torch.maximum(la[:, 0], lb[:, 1]), la[:, 1], lb[:, 0]], 1)
        torch.testing.assert_close(asm(x), want)


def test_export_prints_the_parity_report_and_latency(ws, pipeline):
    out = script_ok(pipeline["export"])
    assert re.search(r"opset\s+\d+", out) and "parity batch 1" in out and "parity batch 3" in out
    assert re.search(r"latency batch 1\s+[\d.]+ ms \(onnxruntime CPU, 1 thread\)", out), out
    assert re.search(r"latency batch 32\s+[\d.]+ ms", out), out
    assert api.read_onnx_metadata(ws["dir"] / "assembled.onnx")["class_names"] == list(CLASSES)


def test_export_pt2_is_a_torch_export_archive_that_reloads(ws, pipeline):
    out = ok("export", "assembled.mdafx", "-o", "assembled.pt2")
    assert "pt2 export" in out and "parity batch 3" in out and "torch.export" in out
    program = torch.export.load(ws["dir"] / "assembled.pt2")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), api.load(ws["dir"] / "assembled.mdafx")(x))
    assert api.read_pt2_metadata(ws["dir"] / "assembled.pt2")["class_names"] == list(CLASSES)
    expect_usage = call("export", "assembled.mdafx", "--format", "pt2", "--latency")
    assert expect_usage[0] == cli.EXIT_USAGE and "go with ONNX" in expect_usage[2]


def test_evaluate_matches_the_model(ws, pipeline):
    out = script_ok(pipeline["evaluate"])
    correct, total = accuracy_of(api.load(ws["dir"] / "assembled.mdafx").module, seed=2)
    assert re.search(rf"overall\s+{total}\s+{correct}\s+{correct / total:.2%}", out), out


def test_inspect_dumps_each_pass_and_renders_svg_with_dot(ws, pipeline):
    out = script_ok(pipeline["inspect"])
    dump = ws["dir"] / "dumps" / "weights"
    for name in ("00_input.txt", "00_input.dot", "00_input.svg", "01_prune-channels.txt",
                 "01_prune-channels.svg"):
        assert (dump / name).is_file() and str(Path("dumps") / "weights" / name) in out, name
    assert "prune-channels" in (dump / "01_prune-channels.txt").read_text()


def test_routes_table_and_svg(ws, pipeline):
    out = script_ok(pipeline["routes"])
    svg = ET.parse(ws["dir"] / "routes.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    rows = [g for g in svg.iter(f"{ns}g") if g.get("class") == "layer"]
    assert [g.get("data-layer") for g in rows] == list(LAYERS)
    colours = {"a-only", "b-only", "both", "neither"}
    seen = set()
    for g in rows:
        cells = [r.get("class") for r in g.iter(f"{ns}rect")]
        assert len(cells) == LAYERS[g.get("data-layer")] and set(cells) <= colours
        seen |= set(cells)
        # the table row says the same: layer, channels, cat, dog, shared, only cat, only dog
        row = re.search(rf"^{re.escape(g.get('data-layer'))}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+"
                        rf"(\d+)\s+(\d+)\s+(\d+)", out, re.M)
        n, a, b, both, only_a, only_b, neither = map(int, row.groups())
        assert (n, both, only_a, only_b, neither) == (
            len(cells), cells.count("both"), cells.count("a-only"), cells.count("b-only"),
            cells.count("neither"))
        assert (a, b) == (both + only_a, both + only_b)
    assert len(seen) >= 2  # the two classes' routes differ somewhere


def test_info_json_through_the_script(ws, pipeline):
    info = json.loads(script_ok(pipeline["info"]))
    comp = api.load(ws["dir"] / "components" / "frog-cat.mdafx")
    assert info["kind"] == "component" and info["classes"] == ["frog", "cat"]
    assert info["source_classes"] == [2, 0] and info["params"] == comp.params
    assert info["macs"] == api.count_macs(comp.module) and info["input"] == FMT
    assert info["provenance"]["model"] == "tiny_cnn"


# ----------------------------------------------------------------------------- info and --json

def _table_value(out: str, key: str) -> str:
    return re.search(rf"^{re.escape(key)}\s+(.*?)\s*$", out, re.M).group(1)


def test_info_on_every_kind_of_file(ws, pipeline):
    out = ok("info", PROFILE)
    assert re.search(r"1\s+dog\s+1\b", out) and re.search(r"fc\s+3x32\s+1\b", out), out
    assert "3 of 18 images (holdout 0.1, seed 0)" in out and "never run" in out
    as_json = json.loads(ok("info", PROFILE, "--json"))
    assert as_json["kind"] == "profile" and as_json["samples_per_class"] == [1, 1, 1]
    assert as_json["calibration"]["held_out"] == 3

    out = ok("info", "components/cat-dog.mdafx")
    as_json = json.loads(ok("--json", "info", "components/cat-dog.mdafx"))
    assert _table_value(out, "params").startswith(f"{as_json['params']:,} (")
    assert _table_value(out, "MACs").startswith(f"{as_json['macs']:,} (")
    assert _table_value(out, "kind") == "component" == as_json["kind"]

    out = ok("info", "assembled.mdafx")
    as_json = json.loads(ok("info", "assembled.mdafx", "--json"))
    asm = api.load(ws["dir"] / "assembled.mdafx")
    assert as_json["kind"] == "assembled" and as_json["layout"] == "parallel"
    assert as_json["params"] == asm.params and _table_value(out, "params") == f"{asm.params:,}"
    assert as_json["class_map"] == asm.class_map and re.search(r"2\s+frog\s+#1 weights\[2\]", out)
    # the pipeline assembles with MDA's factors on 8 calibration images per component
    assert _table_value(out, "calibration") == "mda on [8, 8] samples per component"
    assert _table_value(out, "calibration accuracy").endswith(")")

    # an ONNX file told apart by content, whatever its name
    shutil.copy(ws["dir"] / "assembled.onnx", ws["dir"] / "renamed.mdafx")
    out = ok("info", "renamed.mdafx")
    as_json = json.loads(ok("info", "renamed.mdafx", "--json"))
    assert as_json["kind"] == "onnx" and [v["name"] for v in as_json["inputs"]] == ["input"]
    assert as_json["outputs"][0]["shape"][1] == 3 and re.search(r"inputs\s+input\s+FLOAT", out)
    assert as_json["metadata"]["class_names"] == list(CLASSES)
    expect_error(r"weights\.pt: a zip archive", "info", "weights.pt")
    expect_error(r"usermodels\.py: not an mdafx profile, model file or ONNX file", "info",
                 "usermodels.py")


def test_json_output_has_the_numbers_of_the_tables(ws, pipeline):
    table = script_ok(pipeline["analyse"])
    data = json.loads(ok("--json", "analyse", *MODEL, *NORM, "--data", "data/train",
                         "-o", "json_profile.safetensors"))
    for c in data["classes"]:
        assert re.search(rf"{c['name']}\s+{c['images']}\s+{c['profiled']}\s+{c['held_out']}\b",
                         table)
    data = json.loads(ok("evaluate", "assembled.mdafx", "--data", "data/test", "--json"))
    overall = data["per_class"][-1]
    assert re.search(rf"overall\s+{overall['samples']}\s+{overall['correct']}\s+"
                     rf"{overall['accuracy']:.2%}", script_ok(pipeline["evaluate"]))
    data = json.loads(ok("--json", "routes", *MODEL, "--profile", PROFILE, "--classes",
                         "cat,dog", "-o", "routes_json.svg"))
    for layer in data["layers"]:
        assert re.search(rf"^{layer['layer']}\s+{layer['in_channels']}\s+{layer['a']}\s+"
                         rf"{layer['b']}\s+{layer['shared']}\b", script_ok(pipeline["routes"]),
                         re.M)
    data = json.loads(ok("--json", "disassemble", *MODEL, "--profile", PROFILE, "--task",
                         "cat,dog", "-o", "json.mdafx"))
    [c] = data["components"]
    assert c["task"] == ["cat", "dog"] and c["params"] == api.load("json.mdafx").params
    data = json.loads(ok("--json", "export", "json.mdafx", "--no-check"))
    assert data["parity"] is None and data["opset"] >= 18
    quiet = ok("--quiet", "export", "json.mdafx", "-o", "quiet.onnx")
    assert quiet.strip() == "wrote quiet.onnx"


def test_evaluate_a_source_model_on_a_task(ws):
    out = ok("evaluate", *MODEL, *NORM, "--data", "data/test")
    correct, total = accuracy_of(ws["model"], seed=2)
    assert re.search(rf"overall\s+{total}\s+{correct}\s", out), out
    out = ok("evaluate", *MODEL, *NORM, "--data", "data/test", "--task", "frog,cat")
    logits, labels = predict(ws["model"], ArrayDataset(*images(4, seed=2), mean=MEAN,
                                                       std=STD).batches(64))
    keep = labels != 1
    want = api.task_accuracy(logits[keep], labels[keep], [2, 0])
    assert re.search(rf"overall\s+8\s+{round(want * 8)}\s+{want:.2%}", out), out
    assert "skipped folders not in the model: dog" in out and "on task frog,cat" in out


def test_evaluate_a_component_beside_its_source(ws, pipeline):
    out = ok("evaluate", "components/cat-frog.mdafx", *MODEL, "--data", "data/test")
    assert re.search(r"overall\s+8\s+\d+\s+\d+\.\d+%\s+\d+\.\d+%\s+[+-]\d+\.\d+", out), out
    assert "source accuracy" in out and "delta pts" in out


# ----------------------------------------------------------------------------- files are data

@pytest.mark.parametrize("attack", ["os:system", "subprocess:getoutput"])
def test_a_model_file_never_runs_what_its_metadata_names(ws, pipeline, attack, tmp_path):
    """Provenance only: no command builds, imports or loads what a file's metadata names."""
    marker = tmp_path / "pwned"

    def poison(meta):
        meta.update(model=attack, model_args=[["command", f"touch {marker}"]],
                    weights=str(tmp_path / "nowhere.pt"), num_classes_source=3)

    bad = edited_model_file(ws["dir"] / "components" / "cat-dog.mdafx", tmp_path / "bad.mdafx",
                            metadata=poison)
    other = "components/cat-frog.mdafx"
    commands = [
        ["evaluate", bad, "--data", "data/test"], ["export", bad, "-o", tmp_path / "bad.onnx"],
        ["assemble", bad, other, "-o", tmp_path / "par.mdafx"],
        ["assemble", bad, other, "--layout", "merged", "-o", tmp_path / "mer.mdafx"],
        ["finetune", bad, "--data", "data/train", "--epochs", "1", "-o", tmp_path / "ft.mdafx"],
        ["inspect", bad, "-o", tmp_path / "dumps"], ["inspect", bad, other, "-o", tmp_path / "d2"],
        ["info", bad], ["info", tmp_path / "par.mdafx"],
    ]
    for args in commands:
        code, _, err = call(*args)
        assert code == 0 or (code == 1 and err.startswith("mdafx: error: ")
                             and len(err.strip().splitlines()) == 1), (args, err)
        assert "Traceback" not in err and not marker.exists(), args
    assert "(recorded only, never run)" in ok("info", bad)


def test_merged_layout_from_files_without_the_source_weights(ws, pipeline, tmp_path):
    shutil.copy(ws["dir"] / "weights.pt", tmp_path / "gone.pt")
    ok("disassemble", "--model", "tiny_cnn", "--weights", tmp_path / "gone.pt", "--profile",
       PROFILE, "--task", "cat,dog", "--task", "cat,frog", "-o", tmp_path / "comps")
    (tmp_path / "gone.pt").unlink()
    files = [tmp_path / "comps" / f for f in ("cat-dog.mdafx", "cat-frog.mdafx")]
    for layout in ("merged", "parallel"):
        out = ok("assemble", *files, "--layout", layout, "--calibrate", "data/calib",
                 "-o", tmp_path / f"{layout}.mdafx")
        assert f"{layout} layout, 2 components" in out
    merged, parallel = (api.load(tmp_path / f"{k}.mdafx") for k in ("merged", "parallel"))
    assert merged.layout == "merged" and merged.class_names == parallel.class_names
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), parallel(x), rtol=1e-4, atol=1e-5)


def test_component_from_a_newer_format_version(ws, pipeline):
    src = ws["dir"] / "components" / "cat-dog.mdafx"
    future = edited_model_file(src, ws["dir"] / "future.mdafx",
                               header=lambda h: h.update(format_version="99"))
    pattern = r"future\.mdafx: written by mdafx .*format v99.*upgrade mdafx"
    expect_error(pattern, "evaluate", future, "--data", "data/test")
    expect_error(pattern, "assemble", future, src, "-o", "never.mdafx")
    expect_error(pattern, "info", future)


# ----------------------------------------------------------------------------- classes by name

def test_numeric_class_names_are_names(ws, tmp_path):
    names = ("1", "2", "3")
    write_imagefolder(tmp_path / "digits", *images(6, seed=0), names=names)
    ok("analyse", *MODEL, *NORM, "--data", tmp_path / "digits", "-o", tmp_path / "p.st")
    base = ["disassemble", *MODEL, "--profile", tmp_path / "p.st"]
    ok(*base, "--task", "1,3", "-o", tmp_path / "by_name.mdafx")
    comp = api.load(tmp_path / "by_name.mdafx")
    assert comp.class_names == ["1", "3"] and comp.classes == [0, 2]
    ok(*base, "--task", "#0,#2", "-o", tmp_path / "by_index.mdafx")
    assert api.load(tmp_path / "by_index.mdafx").class_names == ["1", "3"]
    ok(*base, "--task", "#0", "-o", tmp_path / "first.mdafx")
    assert api.load(tmp_path / "first.mdafx").class_names == ["1"]
    expect_error(r"unknown class '0'.*write #0", *base, "--task", "0,1", "-o", tmp_path / "x")


def test_cost_exponent_flag_replaces_the_recipes(ws, pipeline, tmp_path):
    base = ["disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog"]
    ok(*base, "--recipe", "mda", "--cost-exponent", "0.5", "-o", tmp_path / "aware.mdafx")
    meta = api.load(tmp_path / "aware.mdafx").metadata
    assert meta["recipe"]["cost_exponents"] == [0.5] and meta["thresholds"]["cost_exponent"] == 0.5
    code, _, err = call(*base, "--recipe", "reference", "--cost-exponent", "0.5",
                        "-o", tmp_path / "ref.mdafx")
    assert code == cli.EXIT_USAGE and "--cost-exponent: the reference recipe" in err, err
    assert not (tmp_path / "ref.mdafx").exists()


@pytest.mark.parametrize("task, pattern", [
    ("cat,zebra", r"unknown class 'zebra'; known classes: cat, dog, frog"),
    ("#0,#7", r"class index 7 out of range 0\.\.2"),
    ("cat,cat", r"the task repeats a class"),
])
def test_unknown_class_name_or_index(ws, pipeline, task, pattern):
    expect_error(pattern, "disassemble", *MODEL, "--profile", PROFILE, "--task", "dog",
                 "--task", task, "-o", "unknown")
    assert not (ws["dir"] / "unknown").exists()  # checked before any component is written


def test_control_characters_in_names_are_escaped(ws, tmp_path):
    names = ("cat\x1b[31m", "dog\nfake line", "frog")
    write_imagefolder(tmp_path / "odd", *images(2, seed=3), names=names)
    code, out, err = call("evaluate", *MODEL, *NORM, "--data", tmp_path / "odd")
    assert code == 0, err
    assert "\x1b" not in out and "cat\\x1b[31m" in out and "dog\\x0afake line" in out
    assert not any(line.startswith("fake line") for line in out.splitlines())
    expect_error(r"unknown class 'x\\x1b\[2J'", "routes", *MODEL, "--profile", PROFILE,
                 "--classes", "cat,x\x1b[2J", "-o", tmp_path / "r.svg")
    code, _, err = call("info", PROFILE, "extra\x1b[2J")  # argparse quotes what was typed
    assert code == 2 and "\x1b" not in err and "extra\\x1b[2J" in err, err


# ----------------------------------------------------------------------------- output safety

def test_outputs_are_checked_before_any_work(ws, pipeline, tmp_path):
    before = (ws["dir"] / PROFILE).read_bytes()
    touch = ["--model", "usermodels:touches"]
    expect_error(r"is also an input of this command", "disassemble", *touch, "--profile",
                 PROFILE, "--task", "cat,dog", "-o", PROFILE, "--force")
    assert not (ws["dir"] / "built.marker").exists()  # the model was never built
    assert (ws["dir"] / PROFILE).read_bytes() == before
    expect_error(r"two outputs of this command are the same file", "disassemble", *touch,
                 "--profile", PROFILE, "--task", "cat,dog", "--max-drop", "1",
                 "--search-table", "same.mdafx", "-o", "same.mdafx")
    expect_error(r"is also an input", "export", "assembled.mdafx", "-o", "assembled.mdafx")
    (tmp_path / "adir").mkdir()
    expect_error(r"adir: is a directory; --force only replaces regular files", "analyse", *touch,
                 *NORM, "--data", "data/train", "-o", tmp_path / "adir", "--force")
    expect_error(r"/dev/null: is not a regular file", "routes", *touch, "--profile", PROFILE,
                 "--classes", "cat,dog", "-o", "/dev/null", "--force")
    assert not (ws["dir"] / "built.marker").exists()


def test_a_failing_command_leaves_no_partial_output(ws, pipeline, tmp_path):
    table = tmp_path / "search.md"
    expect_error(r"/proc/mdafx-nope/plot\.svg", "disassemble", *MODEL, "--profile", PROFILE,
                 "--task", "cat,dog", "--task", "dog,frog", "--max-drop", "100",
                 "--calibrate", "data/calib", "--search-table", table,
                 "--search-plot", "/proc/mdafx-nope/plot.svg", "-o", tmp_path / "comps")
    assert not table.exists() and not list(tmp_path.glob("comps/*"))
    expect_error(r"torch\.fx could not trace Untraceable", "analyse", "--model",
                 "usermodels:Untraceable", *NORM, "--data", "data/train", "-o",
                 tmp_path / "p.st")
    assert not (tmp_path / "p.st").exists()


def test_refuses_to_overwrite_without_force(ws, pipeline):
    before = (ws["dir"] / "routes.svg").read_bytes()
    for args in (["analyse", *MODEL, *NORM, "--data", "data/train", "-o", PROFILE],
                 ["routes", *MODEL, "--profile", PROFILE, "--classes", "dog,frog",
                  "-o", "routes.svg"],
                 ["export", "assembled.mdafx"]):
        expect_error(r"already exists; pass --force", *args)
    assert (ws["dir"] / "routes.svg").read_bytes() == before
    ok("routes", *MODEL, "--profile", PROFILE, "--classes", "dog,frog", "-o", "routes.svg",
       "--force")
    assert (ws["dir"] / "routes.svg").read_bytes() != before
    expect_error(r"not empty; pass --force", "demo", "--out", "components")
    expect_error(r"dumps/weights: already exists and is not empty", "inspect", *MODEL,
                 "--profile", PROFILE, "--task", "cat,dog", "-o", "dumps")


# ----------------------------------------------------------------------------- bad inputs

def test_missing_weights_file_through_the_script(ws):
    result = run(ws, "analyse", "--model", "tiny_cnn", "--weights", "nope.pt",
                 "--data", "data/train", "-o", "p.st")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "mdafx: error: nope.pt: weights file not found"


def test_bad_weights(ws):
    (ws["dir"] / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a torch file")
    expect_error(r"corrupt\.pt: cannot read the weights", "analyse", "--model", "tiny_cnn",
                 "--weights", "corrupt.pt", *NORM, "--data", "data/train", "-o", "p.st")
    expect_error(r"'fc\.weight' has shape \[3, 32\] in the file but \[10, 32\]", "inspect",
                 *MODEL, "--num-classes", "10", *NORM, "-o", "never")
    expect_error(r"key '0\.weight' \(shape \[4, 3, 3, 3\]\) is missing from the file",
                 "analyse", "--model", "usermodels:small", "--weights", "weights.pt",
                 "--data", "data/train", "-o", "p.st", *NORM)


def test_a_factory_calling_sys_exit_does_not_end_mdafx(ws):
    expect_error(r"usermodels:exits: the factory called sys\.exit\(0\)", "analyse", "--model",
                 "usermodels:exits", *NORM, "--data", "data/train", "-o", "p.st")


@pytest.mark.parametrize("case", ["empty", "big", "deep"])
def test_bad_image_folders(ws, tmp_path, case):
    root = write_imagefolder(tmp_path / case, *images(2, seed=3, size=20 if case == "big"
                                                      else SIZE))
    if case == "empty":
        for f in (root / "dog").iterdir():
            f.unlink()
        pattern = r"class folder .*dog.* contains no images"
    elif case == "big":
        pattern = r"images are 20x20 .* but the model takes 16x16"
    else:
        Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(root / "cat" /
                                                                           "000.png")
        pattern = r"000\.png' has mode 'I.*16-bit or float"
    expect_error(pattern, "analyse", *MODEL, *NORM, "--data", root, "-o", tmp_path / "p.st")


def test_profile_from_another_model(ws, pipeline):
    expect_error(r"profile\.safetensors was not computed on --model tiny_cnn with these weights",
                 "disassemble", "--model", "tiny_cnn", "--weights", "other.pt",
                 "--profile", PROFILE, "--task", "cat,dog", "-o", "x.mdafx")


def test_usage_errors_exit_2(ws):
    for args in (["analyse"], ["nonsense"],
                 ["disassemble", *MODEL, "--profile", "p", "--task", "a", "-o", "x",
                  "--alpha-conv", "1.5"],
                 ["evaluate", "--data", "data/test"],
                 ["routes", *MODEL, "--profile", PROFILE, "--classes", "a,b,c", "-o", "r.svg"],
                 ["analyse", *MODEL, "--mean", "nan", "--data", "d", "-o", "p"],
                 ["analyse", *MODEL, "--std", "0", "--data", "d", "-o", "p"],
                 ["analyse", *MODEL, "--std", "inf", "--data", "d", "-o", "p"],
                 ["analyse", *MODEL, "--model-arg", "width=1e999", "--data", "d", "-o", "p"],
                 ["export", "a.mdafx", "--rtol", "nan"], ["finetune", "a.mdafx", "--data", "d",
                                                          "--epochs", "1", "--lr", "inf",
                                                          "-o", "o"],
                 ["finetune", "a.mdafx", "--data", "d", "--epochs", "1", "-o", "o",
                  "--teacher-weights", "w.pt"],
                 ["inspect", "a.mdafx", *MODEL, "-o", "d"],
                 ["assemble", "a.mdafx", "-o", "o.mdafx"]):
        code, _, err = call(*args)
        assert code == cli.EXIT_USAGE and "usage: mdafx" in err, (args, err)


def test_budget_flag_usage_errors(ws):
    base = ["disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog", "-o", "x"]
    for extra in (["--recipe", "mda", "--calibrate", "data/calib"],
                  ["--recipe", "mda", "--search-table", "t.md"], ["--recipe", "mda", "--strict"],
                  ["--recipe", "nope"], ["--max-params", "0"], ["--max-macs", "150%"], ["--max-drop", "-1"],
                  ["--max-drop", "nan"]):
        code, _, err = call(*base, *extra)
        assert code == cli.EXIT_USAGE and "usage: mdafx" in err, (extra, err)


def test_debug_shows_the_traceback(ws):
    code, _, err = call("--debug", "inspect", *MODEL, "--num-classes", "10", *NORM, "-o", "never")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("mdafx: error: ")


def test_keyboard_interrupt_and_bugs(ws, monkeypatch):
    import mdafx.cli.export as export_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_command, "run", interrupted)
    code, _, err = call("export", "whatever.mdafx")
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err

    def buggy(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(export_command, "run", buggy)
    code, _, err = call("export", "whatever.mdafx")
    assert code == 1 and "Traceback" in err
    assert err.rstrip().splitlines()[-1] == "mdafx: internal error: ZeroDivisionError: oops"


def test_inspect_without_dot_says_so(ws, monkeypatch):
    import mdafx.inspection

    monkeypatch.setattr(mdafx.inspection.shutil, "which", lambda name: None)
    out = ok("inspect", "--model", "usermodels:small", *NORM, "--density", "0.5",
             "-o", "dumps_nodot")
    assert "Graphviz 'dot' not found: no SVG written" in out
    assert not list((ws["dir"] / "dumps_nodot").rglob("*.svg"))
    assert (ws["dir"] / "dumps_nodot" / "usermodels_small" / "01_prune-channels.txt").is_file()


def test_inspect_an_assembly_and_one_file(ws, pipeline):
    files = ["components/cat-dog.mdafx", "components/cat-frog.mdafx"]
    out = ok("inspect", *files, "--layout", "merged", "-o", "dumps_asm")
    assert "assembly of 2 components (merged layout)" in out
    passes = sorted(p.name for p in (ws["dir"] / "dumps_asm" / "assembly").glob("*.txt"))
    assert passes[0] == "00_input.txt" and any("align-padding" in p for p in passes), passes
    out = ok("inspect", "assembled.mdafx", "-o", "dumps_one")
    assert "the model's graph (no pass)" in out
    assert (ws["dir"] / "dumps_one" / "assembled" / "00_input.txt").is_file()


# ----------------------------------------------------------------------------- budgets (#6)

def test_disassemble_to_a_budget_on_calibration_images(ws, pipeline):
    out = ok("disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog", "--max-drop", "0",
             "--recipe", "mda", "--reestimate-norms", "--calibrate", "data/calib", "--search-table", "search.md",
             "--search-plot", "search.svg", "-o", "budget/cat-dog.mdafx")
    meta = api.load(ws["dir"] / "budget" / "cat-dog.mdafx").metadata
    assert meta["search"]["met"] and meta["search"]["budget"]["max_acc_drop"] == 0
    cal = meta["calibration"]
    assert cal["images"] == 8 and cal["accuracy"] >= cal["source_accuracy"]  # cat + dog images
    assert meta["norms_reestimated_on"] == 12                   # every class: 4 + 4 + 4
    assert f"{cal['accuracy']:.2%} ({cal['source_accuracy']:.2%})" in out
    assert f"{meta['macs']:,} ({meta['macs'] / meta['macs_source']:.1%})" in out
    table = (ws["dir"] / "search.md").read_text()
    assert table.startswith("## cat,dog") and "budget met" in table and "| *" in table
    svg = ET.parse(ws["dir"] / "search.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    [panel] = [g for g in svg.iter(f"{ns}g") if g.get("class") == "search"]
    dots = [c.get("class") for c in panel.iter(f"{ns}circle")]
    assert dots.count("candidate chosen") == 1 and "candidate chosen legend" in dots
    # what the search scored is what evaluate measures on the same images
    ev = ok("evaluate", "budget/cat-dog.mdafx", "--data", "data/calib")
    assert re.search(rf"overall\s+8\s+\d+\s+{cal['accuracy']:.2%}", ev), ev


def test_an_unmet_budget_warns_or_fails_with_strict(ws, pipeline, tmp_path):
    args = ["disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog", "--task",
            "dog,frog", "--max-macs", "0.1%", "--calibrate", "data/calib"]
    code, out, err = call(*args, "--strict", "--search-table", tmp_path / "t.md",
                          "-o", tmp_path / "strict")
    assert code == 1 and err.splitlines()[-1].startswith("mdafx: error: task cat,dog: budget "
                                                         "not met; task dog,frog")
    assert "no component written (--strict)" in err and "Traceback" not in err
    assert not (tmp_path / "strict").exists() and (tmp_path / "t.md").is_file()
    code, out, err = call(*args, "-o", tmp_path / "loose")
    assert code == 0, err
    assert re.search(r"warning: task cat,dog: BUDGET NOT MET: none of the \d+ candidates meets "
                     r"MACs <= 0\.1% of the source", err), err
    assert "warning: task dog,frog" in err and re.search(r"cat,dog .*\bNO\b", out)
    assert api.load(tmp_path / "loose" / "cat-dog.mdafx").metadata["search"]["met"] is False


def test_calibration_defaults_to_the_held_out_split(ws):
    ok("analyse", *MODEL, *NORM, "--data", "data/train", "--holdout", "0.5", "-o", "half.st")
    out = ok("disassemble", *MODEL, "--profile", "half.st", "--task", "dog,frog",
             "--recipe", "mda", "--reestimate-norms", "--norm-images", "2", "-o", "held/dog-frog.mdafx")
    meta = api.load(ws["dir"] / "held" / "dog-frog.mdafx").metadata
    assert "held out of" in meta["calibration"]["data"] and "--holdout 0.5" in out
    assert meta["calibration"]["images"] == 6 and meta["norms_reestimated_on"] == 6
    assert "search" not in meta  # no budget: the given thresholds, re-estimated


def test_calibration_split_missing_or_changed(ws, tmp_path):
    ok("analyse", *MODEL, *NORM, "--data", "data/train", "--holdout", "0", "-o", "none.st")
    expect_error(r"holds no calibration split.*--calibrate DIR", "disassemble", *MODEL,
                 "--profile", "none.st", "--task", "cat,dog", "--max-drop", "1", "-o", "never")
    shutil.copytree(ws["dir"] / "data" / "train", tmp_path / "train")
    ok("analyse", *MODEL, *NORM, "--data", tmp_path / "train", "--holdout", "0.5",
       "-o", "moved.st")
    first = sorted((tmp_path / "train" / "dog").iterdir())[0]
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(first)
    expect_error(r"changed since the profile was computed", "disassemble", *MODEL,
                 "--profile", "moved.st", "--task", "cat,dog", "--max-drop", "1", "-o", "never")
    assert not (ws["dir"] / "never").exists()


# ----------------------------------------------------------------------------- fine-tuning

def test_finetune_a_component_keeps_its_architecture(ws, pipeline):
    out = ok("finetune", "components/cat-dog.mdafx", "--data", "data/train", "--epochs", "2",
             "--holdout", "0.5", "--batch-size", "4", "-o", "tuned.mdafx")
    before = api.load(ws["dir"] / "components" / "cat-dog.mdafx").module.state_dict()
    tuned = api.load(ws["dir"] / "tuned.mdafx")
    after = tuned.module.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ft = tuned.metadata["finetune"]
    assert ft["epochs"] == 2 and ft["teachers"] == "self" and ft["eval_images"] == 6
    assert ft["train_images"] == 6 and tuned.class_names == ["cat", "dog"]
    assert re.search(rf"accuracy after\s+{ft['acc_after']:.2%}", out), out


def test_finetune_an_assembled_model_with_one_teacher_per_component(ws, pipeline):
    teacher = ["--teacher-model", "tiny_cnn", "--teacher-weights", "weights.pt"]
    out = ok("finetune", "assembled.mdafx", "--data", "data/train", "--eval", "data/test",
             "--epochs", "1", *teacher, *teacher, "--augment", "-o", "tuned_asm.mdafx")
    meta = api.load(ws["dir"] / "tuned_asm.mdafx").metadata["finetune"]
    assert meta["teachers"] == "sources" and meta["eval_images"] == 12
    assert meta["train_images"] == 18 and "2 (--teacher-model)" in out
    assert [t["model"] for t in meta["teacher_models"]] == ["tiny_cnn", "tiny_cnn"]
    # held-out images from a folder with other class folders (only cat and frog)
    shutil.copytree(ws["dir"] / "data" / "test" / "cat", ws["dir"] / "two" / "cat")
    shutil.copytree(ws["dir"] / "data" / "test" / "frog", ws["dir"] / "two" / "frog")
    ok("finetune", "assembled.mdafx", "--data", "data/train", "--eval", "two", "--epochs", "1",
       "-o", "tuned_two.mdafx")
    ft = api.load(ws["dir"] / "tuned_two.mdafx").metadata["finetune"]
    x, y = images(4, seed=2)
    keep = y != 1
    logits, _ = predict(api.load(ws["dir"] / "assembled.mdafx").module,
                        ArrayDataset(x[keep], y[keep], mean=MEAN, std=STD).batches(64))
    assert ft["eval_images"] == 8
    assert ft["acc_before"] == float((logits.argmax(1) == torch.as_tensor(y[keep])).float()
                                     .mean())
    expect_error(r"1 --teacher-model for 2 component\(s\)", "finetune", "assembled.mdafx",
                 "--data", "data/train", "--epochs", "1", *teacher, "-o", "never.mdafx")
    expect_error(r"nope\.pt: teacher weights file not found", "finetune",
                 "components/cat-dog.mdafx", "--data", "data/train", "--epochs", "1",
                 "--teacher-model", "tiny_cnn", "--teacher-weights", "nope.pt",
                 "-o", "never.mdafx")
    assert not (ws["dir"] / "never.mdafx").exists()


# ----------------------------------------------------------------------------- demo

@pytest.mark.data
def test_demo_on_cifar10_uses_the_embedded_sources(ws, tmp_path):
    root = os.environ.get("MDAFX_DATA")
    if not root or not (Path(root) / "cifar10" / "train").is_dir():
        pytest.skip("set MDAFX_DATA to the folder holding cifar10/ (.ci/run does)")
    out_dir = tmp_path / "demo"
    out = ok("demo", "--data", Path(root) / "cifar10", "--train-per-class", "20",
             "--test-per-class", "10", "--out", out_dir)
    joint, ort = (re.search(rf"^{re.escape(r)}\s+4: both tasks\s+\d+\s+([\d.]+)%", out, re.M)
                  .group(1) for r in ("assembled, calibrated", "assembled, calibrated, "
                                                                 "onnxruntime"))
    assert joint == ort, out
    for row in ("component of cifar10-vgg", "component of cifar10-resnet20"):
        assert re.search(rf"{re.escape(row)}\s+\S+.*\d+\.\d%", out), (row, out)
    asm = api.load(out_dir / "assembled.mdafx")
    assert len(asm.class_names) == 4 and (out_dir / "assembled.onnx").is_file()

def test_demo_runs_end_to_end(ws, tmp_path):
    out_dir = tmp_path / "demo"
    out = ok("demo", "--out", out_dir, "--epochs", "1", "--train-per-class", "20", "--no-images")
    for row in ("component of source0_tiny_cnn", "component of source1_resnet_cifar",
                "assembled, MDA 2.1 scaling", "assembled, calibrated jointly",
                "assembled, feature head", "assembled, feature head, onnxruntime"):
        assert re.search(rf"{re.escape(row)}\s+\S+.*\d+\.\d%", out), (row, out)
    head, ort = (re.search(rf"{re.escape(r)}\s+6: both tasks\s+\d+\s+([\d.]+)%", out).group(1)
                 for r in ("assembled, feature head ", "assembled, feature head, onnxruntime"))
    assert head == ort  # the exported file scores what the model does
    for name in ("assembled.mdafx", "assembled.onnx", "component0_disk-ring-square.mdafx",
                 "component1_plus-cross-tri.mdafx", "source0_tiny_cnn.pt",
                 "source1_resnet_cifar.profile.safetensors"):
        assert (out_dir / name).is_file(), name
    assert api.load(out_dir / "assembled.mdafx").class_names == [
        "disk", "ring", "square", "plus", "cross", "tri"]


def test_default_recipe_and_feature_head(ws, pipeline, tmp_path):
    """The defaults: thresholds searched with layer reconstruction on the profile's held-out
    split, a feature head fitted for the assembly (joint logit calibration on request); both
    print per-class calibration accuracy."""
    script_ok(pipeline["disassemble"])
    out = ok("disassemble", *MODEL, "--profile", PROFILE, "--task", "cat,dog", "-o",
             tmp_path / "cd.mdafx")
    assert "recipe default" in out and "per class" in out
    comp = api.load(tmp_path / "cd.mdafx")
    assert comp.metadata["recipe"]["name"] == "default"
    assert comp.metadata["recipe"]["recovery"]["reconstruct"] is True
    # both cost-exponent searches survive the file: the one kept is the one the thresholds use
    choice = comp.metadata["cost_exponent_choice"]
    assert [c["cost_exponent"] for c in choice if c["chosen"]] == \
        [comp.metadata["thresholds"]["cost_exponent"]]
    out = ok("assemble", tmp_path / "cd.mdafx", "components/frog-cat.mdafx", "--calibrate",
             "data/calib", "-o", tmp_path / "a.mdafx")
    asm = api.load(tmp_path / "a.mdafx")
    assert asm.metadata["calibration"]["method"] == "head" and "component alone" in out
    assert asm.class_names == ["cat", "dog", "frog"] and re.search(r"\bcat\s.*\bhead\b", out)
    head = asm.module.get_submodule("mdafx_head")
    assert head.out_features == 3 and head.in_features == asm.metadata["calibration"]["features"]
    out = ok("assemble", tmp_path / "cd.mdafx", "components/frog-cat.mdafx", "--calibrate",
             "data/calib", "--calibration", "joint", "-o", tmp_path / "j.mdafx")
    joint = api.load(tmp_path / "j.mdafx")
    assert joint.metadata["calibration"]["method"] == "joint"
    assert joint.metadata["offsets"] is not None and "component alone" in out
    # inspect shows the pipeline assemble ran: the head pass with --calibrate, none without
    files = [tmp_path / "cd.mdafx", "components/frog-cat.mdafx"]
    ok("inspect", *files, "--calibrate", "data/calib", "-o", tmp_path / "dumps")
    passes = sorted(p.name for p in (tmp_path / "dumps" / "assembly").glob("*.txt"))
    assert any(p.endswith("_insert-feature-head.txt") for p in passes), passes
    ok("inspect", *files, "-o", tmp_path / "plain")
    plain = sorted(p.name for p in (tmp_path / "plain" / "assembly").glob("*.txt"))
    assert any(p.endswith("_insert-logit-scale.txt") for p in plain), plain
    assert not any("feature-head" in p for p in plain), plain
    code, _, err = call("inspect", files[0], "--calibrate", "data/calib", "-o", tmp_path / "one")
    assert code == cli.EXIT_USAGE and "--calibrate goes with several component files" in err, err
