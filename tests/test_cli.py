"""The mdafx command line (mdafx/cli.py), end to end.

Every subcommand runs once through the real console script (``mdafx``, or ``python -m mdafx.cli``
where the script is not installed) on a 3-class tiny_cnn and a tiny ImageFolder written here;
the happy path runs as one chain (``pipeline``), each test checks one step of it. The bad-input
cases call ``mdafx.cli.main`` in this process (same code, same exit codes, no 5 s import per
case); one of them also runs through the script to check the process exit code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdafx import cli
from mdafx.data import ArrayDataset
from mdafx.models import tiny_cnn
from mdafx.serialize import load_model
from mdafx.training import predict, train_classifier

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")
SIZE = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
NORM = ["--input-size", str(SIZE), "--mean", "0.5", "--std", "0.25"]
LAYERS = {"features.0": 3, "features.4": 16, "features.8": 32, "fc": 32}  # tiny_cnn inputs

USER_MODELS = '''
import torch
from torch import nn


def small(num_classes=3):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))


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


def write_imagefolder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def edited_model_file(src: Path, dst: Path, edit) -> Path:
    """A copy of the model file ``src`` whose header (``mdafx.json``) ``edit`` changed in place."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "mdafx.json":
                header = json.loads(data)
                edit(header)
                data = json.dumps(header).encode()
            zout.writestr(item, data)
    return dst


def script() -> list[str]:
    exe = shutil.which("mdafx")
    return [exe] if exe else [sys.executable, "-m", "mdafx.cli"]


def run(ws: dict, *args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``mdafx ARGS`` in the workspace, through the console script."""
    env = {**os.environ, **ws["env"], **(env_extra or {})}
    return subprocess.run([*script(), *map(str, args)], cwd=ws["dir"], env=env,
                          capture_output=True, text=True, timeout=300)


def call(capsys, *args) -> tuple[int, str, str]:
    """``mdafx.cli.main(ARGS)`` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys, pattern: str, *args) -> str:
    code, out, err = call(capsys, *args)
    assert code == cli.EXIT_ERROR, (out, err)
    assert err.startswith("mdafx: error: ") and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
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
    return {"dir": d, "env": env, "model": model}


@pytest.fixture(autouse=True)
def _in_workspace(request, monkeypatch):
    """In-process calls see the workspace as the current directory and cache."""
    if "ws" in request.fixturenames:
        ws = request.getfixturevalue("ws")
        monkeypatch.chdir(ws["dir"])
        monkeypatch.setenv("MDAFX_CACHE", ws["env"]["MDAFX_CACHE"])


MODEL = ["--model", "tiny_cnn", "--weights", "weights.pt"]


@pytest.fixture(scope="module")
def pipeline(ws) -> dict:
    """Every subcommand once through the console script, in order; results by step name."""
    fake_bin = ws["dir"] / "bin"
    fake_bin.mkdir()
    dot = fake_bin / "dot"  # a stand-in Graphviz: writes a minimal SVG to the -o file
    dot.write_text('#!/bin/sh\nwhile [ "$#" -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                   'echo "<svg xmlns=\\"http://www.w3.org/2000/svg\\"/>" > "$out"\n')
    dot.chmod(0o755)
    with_dot = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    steps = {
        "analyse": ["analyse", *MODEL, *NORM, "--data", "data/train", "-o", "profile.pt"],
        "disassemble": ["disassemble", *MODEL, "--profile", "profile.pt", "--task", "cat,dog",
                        "--task", "2,0", "--alpha-conv", "0.25", "-o", "components"],
        "assemble": ["assemble", "components/cat-dog.mdafx", "components/frog-cat.mdafx",
                     "--calibrate", "data/calib", "-o", "assembled.mdafx"],
        "export": ["export", "assembled.mdafx"],
        "evaluate": ["evaluate", "assembled.mdafx", "--data", "data/test"],
        "inspect": ["inspect", *MODEL, "--profile", "profile.pt", "--task", "dog,frog",
                    "-o", "dumps"],
        "routes": ["routes", *MODEL, "--profile", "profile.pt", "--classes", "cat,dog",
                   "-o", "routes.svg"],
    }
    results = {}
    for name, args in steps.items():
        results[name] = run(ws, *args, env_extra=with_dot if name == "inspect" else None)
    return results


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# ----------------------------------------------------------------------------- happy path

def test_help_of_every_subcommand_needs_no_torch(ws):
    commands = ["analyse", "profile", "disassemble", "assemble", "export", "evaluate",
                "inspect", "routes", "finetune", "demo"]
    for command in [None, *commands]:
        result = run(ws, *([command] if command else []), "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: mdafx"), result.stdout
    fallback = subprocess.run([sys.executable, "-m", "mdafx.cli", "--help"], cwd=ws["dir"],
                              env={**os.environ, **ws["env"]}, capture_output=True, text=True)
    assert fallback.returncode == 0 and "disassemble" in fallback.stdout
    probe = ("import sys; from mdafx.cli import main; code = main(['disassemble', '--help']); "
             "assert code == 0 and 'torch' not in sys.modules, sorted(sys.modules)")
    light = subprocess.run([sys.executable, "-c", probe], cwd=ws["dir"], capture_output=True,
                           text=True, env={**os.environ, **ws["env"]})
    assert light.returncode == 0, light.stderr


def test_analyse_writes_a_profile_and_prints_counts(ws, pipeline):
    out = ok(pipeline["analyse"])
    for name in CLASSES:
        assert re.search(rf"\b{name}\s+6\s+1\b", out), out  # 6 images, 1% -> 1 sample
    assert "4 weighted layers profiled" in out
    prof, record = cli.load_profile(ws["dir"] / "profile.pt")
    assert prof.class_names == list(CLASSES) and prof.layers == list(LAYERS)
    assert record["input"] == {"size": [SIZE, SIZE], "channels": 3, "mean": list(MEAN),
                               "std": list(STD)}


def test_disassemble_writes_one_component_per_task(ws, pipeline):
    out = ok(pipeline["disassemble"])
    assert re.search(r"cat,dog\s+0,1\s", out) and re.search(r"frog,cat\s+2,0\s", out), out
    comp = load_model(ws["dir"] / "components" / "frog-cat.mdafx")
    meta = comp.metadata
    assert meta["class_names"] == ["frog", "cat"] and meta["classes"] == [2, 0]
    assert meta["input"] == {"size": [SIZE, SIZE], "channels": 3, "mean": list(MEAN),
                             "std": list(STD)}  # taken from the profile
    assert meta["thresholds"]["conv_alpha"] == 0.25 and meta["source"] == "weights"
    assert meta["params"] < meta["params_source"]
    assert f"{meta['params']:,} ({meta['params'] / meta['params_source']:.1%})" in out
    assert comp(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 2)


def test_assemble_calibrates_and_prints_the_class_map(ws, pipeline):
    out = ok(pipeline["assemble"])
    assert re.search(r"0\s+cat\s+#0 weights\[0\]; #1 weights\[0\]", out), out
    assert re.search(r"2\s+frog\s+#1 weights\[2\]", out), out
    loaded = load_model(ws["dir"] / "assembled.mdafx")
    meta = loaded.metadata
    assert meta["class_names"] == ["cat", "dog", "frog"] and meta["layout"] == "parallel"
    assert meta["calibration"]["samples"] == [8, 8]
    scales = [s for comp in meta["scales"] for s in comp]
    assert all(np.isfinite(scales)) and scales != [1.0] * len(scales)
    # every assembled logit is the scaled logit of its component (cat: the max of both)
    x = torch.randn(3, 3, SIZE, SIZE)
    a, b = (load_model(ws["dir"] / "components" / f) for f in ("cat-dog.mdafx", "frog-cat.mdafx"))
    with torch.no_grad():
        la = a(x) * torch.tensor(meta["scales"][0])
        lb = b(x) * torch.tensor(meta["scales"][1])
        want = torch.stack([torch.maximum(la[:, 0], lb[:, 1]), la[:, 1], lb[:, 0]], 1)
        torch.testing.assert_close(loaded(x), want)


def test_export_prints_the_parity_report(ws, pipeline):
    out = ok(pipeline["export"])
    assert re.search(r"opset\s+\d+", out) and "parity batch 1" in out and "parity batch 3" in out
    from mdafx.export import read_onnx_metadata

    assert read_onnx_metadata(ws["dir"] / "assembled.onnx")["class_names"] == list(CLASSES)


def test_evaluate_matches_the_model(ws, pipeline):
    out = ok(pipeline["evaluate"])
    loaded = load_model(ws["dir"] / "assembled.mdafx")
    x, y = images(4, seed=2)
    logits, labels = predict(loaded.module, ArrayDataset(x, y, mean=MEAN, std=STD).batches(64))
    correct = int((logits.argmax(1) == labels).sum())
    assert re.search(rf"overall\s+12\s+{correct}\s+{correct / 12:.2%}", out), out


def test_inspect_dumps_each_pass_and_renders_svg_with_dot(ws, pipeline):
    out = ok(pipeline["inspect"])
    dump = ws["dir"] / "dumps" / "weights"
    for name in ("00_input.txt", "00_input.dot", "00_input.svg", "01_prune-channels.txt",
                 "01_prune-channels.svg"):
        assert (dump / name).is_file() and str(Path("dumps") / "weights" / name) in out, name
    assert "prune-channels" in (dump / "01_prune-channels.txt").read_text()


def test_routes_table_and_svg(ws, pipeline):
    out = ok(pipeline["routes"])
    svg = ET.parse(ws["dir"] / "routes.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    rows = [g for g in svg.iter(f"{ns}g") if g.get("class") == "layer"]
    assert [g.get("data-layer") for g in rows] == list(LAYERS)
    colours = {"a-only", "b-only", "both", "neither"}
    style = svg.find(f"{ns}style").text
    assert all(f".{c} " in style for c in colours)
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


def test_evaluate_a_source_model_in_process(ws, capsys):
    code, out, err = call(capsys, "evaluate", *MODEL, *NORM, "--data", "data/test")
    assert code == 0, err
    x, y = images(4, seed=2)
    logits, labels = predict(ws["model"], ArrayDataset(x, y, mean=MEAN, std=STD).batches(64))
    correct = int((logits.argmax(1) == labels).sum())
    assert re.search(rf"overall\s+12\s+{correct}\s", out), out


def test_demo_runs_end_to_end(tmp_path):
    out_dir = tmp_path / "demo"
    result = subprocess.run(
        [*script(), "demo", "--out", str(out_dir), "--epochs", "1", "--train-per-class", "30",
         "--no-images"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MDAFX_CACHE": str(tmp_path / "cache")})
    out = ok(result)
    for row in ("component of source0_tiny_cnn", "component of source1_resnet_cifar",
                "assembled, calibrated", "assembled, calibrated, onnxruntime"):
        assert re.search(rf"{re.escape(row)}\s+\S+.*\d+\.\d%", out), (row, out)
    for name in ("assembled.mdafx", "assembled.onnx", "component0_disk-ring-square.mdafx",
                 "component1_plus-cross-tri.mdafx", "source0_tiny_cnn.pt",
                 "source1_resnet_cifar.profile.pt"):
        assert (out_dir / name).is_file(), name
    assert load_model(out_dir / "assembled.mdafx").metadata["class_names"] == [
        "disk", "ring", "square", "plus", "cross", "tri"]


# ----------------------------------------------------------------------------- bad inputs

def test_missing_weights_file_through_the_script(ws):
    result = run(ws, "analyse", "--model", "tiny_cnn", "--weights", "nope.pt",
                 "--data", "data/train", "-o", "p.pt")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "mdafx: error: nope.pt: weights file not found"


def test_corrupt_weights(ws, capsys):
    (ws["dir"] / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a torch file")
    expect_error(capsys, r"corrupt\.pt: cannot read the weights", "analyse", "--model",
                 "tiny_cnn", "--weights", "corrupt.pt", *NORM, "--data", "data/train", "-o", "p.pt")


def test_weights_that_do_not_fit_name_the_key(ws, capsys):
    expect_error(capsys, r"'fc\.weight' has shape \[3, 32\] in the file but \[10, 32\]",
                 "inspect", *MODEL, "--num-classes", "10", *NORM, "-o", "never")
    expect_error(capsys, r"key '0\.weight' \(shape \[4, 3, 3, 3\]\) is missing from the file",
                 "analyse", "--model",
                 "usermodels:small", "--weights", "weights.pt", "--data", "data/train",
                 "-o", "p.pt", *NORM)


@pytest.mark.parametrize("task, pattern", [
    ("cat,zebra", r"unknown class 'zebra'; known classes: cat, dog, frog"),
    ("0,7", r"class index 7 out of range 0\.\.2"),
])
def test_unknown_class_name_or_index(ws, pipeline, capsys, task, pattern):
    expect_error(capsys, pattern, "disassemble", *MODEL, "--profile", "profile.pt",
                 "--task", "dog", "--task", task, "-o", "unknown")
    assert not (ws["dir"] / "unknown").exists()  # checked before any component is written


def test_empty_class_folder(ws, capsys):
    root = write_imagefolder(ws["dir"] / "empty_class", *images(2, seed=3))
    for f in (root / "dog").iterdir():
        f.unlink()
    expect_error(capsys, r"class folder .*dog.* contains no images", "analyse", *MODEL, *NORM,
                 "--data", root, "-o", "p.pt")


def test_images_of_the_wrong_size(ws, capsys):
    root = write_imagefolder(ws["dir"] / "big", *images(2, seed=3, size=20))
    expect_error(capsys, r"images are 20x20 .* but the model takes 16x16", "analyse", *MODEL,
                 *NORM, "--data", root, "-o", "p.pt")


def test_images_of_a_16_bit_mode(ws, capsys):
    root = write_imagefolder(ws["dir"] / "deep", *images(2, seed=3))
    deep = root / "cat" / "000.png"
    Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    expect_error(capsys, r"000\.png' has mode 'I.*16-bit or float", "analyse", *MODEL, *NORM,
                 "--data", root, "-o", "p.pt")


def test_profile_from_another_model(ws, pipeline, capsys):
    expect_error(capsys, r"profile\.pt was not computed on --model tiny_cnn with these weights",
                 "disassemble", "--model", "tiny_cnn", "--weights", "other.pt",
                 "--profile", "profile.pt", "--task", "cat,dog", "-o", "x.mdafx")


def test_untraceable_model(ws, capsys):
    expect_error(capsys, r"torch\.fx could not trace Untraceable", "analyse", "--model",
                 "usermodels:Untraceable", *NORM, "--data", "data/train", "-o", "p.pt")
    assert not (ws["dir"] / "p.pt").exists()


def test_component_from_a_newer_format_version(ws, pipeline, capsys):
    src = ws["dir"] / "components" / "cat-dog.mdafx"
    future = edited_model_file(src, ws["dir"] / "future.mdafx",
                               lambda header: header.update(format_version=99))
    pattern = r"future\.mdafx: written by mdafx .*format v99.*upgrade mdafx"
    expect_error(capsys, pattern, "evaluate", future, "--data", "data/test")
    expect_error(capsys, pattern, "assemble", future, src, "-o", "never.mdafx")


def test_refuses_to_overwrite_without_force(ws, pipeline, capsys):
    before = (ws["dir"] / "routes.svg").read_bytes()
    for args in (["analyse", *MODEL, *NORM, "--data", "data/train", "-o", "profile.pt"],
                 ["routes", *MODEL, "--profile", "profile.pt", "--classes", "dog,frog",
                  "-o", "routes.svg"],
                 ["export", "assembled.mdafx"]):
        expect_error(capsys, r"already exists; pass --force to replace it", *args)
    assert (ws["dir"] / "routes.svg").read_bytes() == before
    code, out, err = call(capsys, "routes", *MODEL, "--profile", "profile.pt",
                          "--classes", "dog,frog", "-o", "routes.svg", "--force")
    assert code == 0, err
    assert (ws["dir"] / "routes.svg").read_bytes() != before
    demo_dir = ws["dir"] / "components"  # not empty
    expect_error(capsys, r"not empty; pass --force", "demo", "--out", demo_dir)


def test_merged_layout_from_component_files(ws, pipeline, capsys):
    """The merged layout rebuilds each component from its recorded source and plan; the merged
    model computes what the parallel one does (same calibration), and is wider."""
    files = ["components/cat-dog.mdafx", "components/frog-cat.mdafx"]
    code, out, err = call(capsys, "assemble", *files, "--layout", "merged", "--calibrate",
                          "data/calib", "-o", "merged.mdafx")
    assert code == 0, err
    merged, parallel = load_model(ws["dir"] / "merged.mdafx"), load_model(
        ws["dir"] / "assembled.mdafx")
    assert merged.metadata["layout"] == "merged"
    assert merged.metadata["class_names"] == parallel.metadata["class_names"]
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), parallel(x), rtol=1e-4, atol=1e-5)


def test_merged_layout_needs_the_source(ws, pipeline, capsys, tmp_path):
    src = ws["dir"] / "components" / "cat-dog.mdafx"
    no_plan = edited_model_file(src, tmp_path / "no_plan.mdafx",
                                lambda h: h["metadata"].pop("plan"))
    expect_error(capsys, r"no_plan\.mdafx: the merged layout rebuilds each component from its "
                         r"source.*--layout parallel", "assemble", no_plan,
                 "components/frog-cat.mdafx", "--layout", "merged", "-o", "never.mdafx")
    other = edited_model_file(src, tmp_path / "other.mdafx",
                              lambda h: h["metadata"].update(num_classes_source=5))
    expect_error(capsys, r"other\.mdafx: rebuilding its source model: .*weights do not fit",
                 "assemble", other, "components/frog-cat.mdafx", "--layout", "merged",
                 "-o", "never.mdafx")

    def shift(header):
        header["metadata"]["plan"]["channel_ids"] += 1

    bad_plan = edited_model_file(src, tmp_path / "bad_plan.mdafx", shift)
    expect_error(capsys, r"bad_plan\.mdafx: cannot rebuild the component from tiny_cnn: .*plan "
                         r"covers \d+ channel ids but the model has \d+.*--layout parallel",
                 "assemble", bad_plan, "components/frog-cat.mdafx", "--layout", "merged",
                 "-o", "never.mdafx")
    assert not (ws["dir"] / "never.mdafx").exists()


def test_usage_errors_exit_2(ws, capsys):
    for args in (["analyse"], ["nonsense"], ["disassemble", *MODEL, "--profile", "p",
                                             "--task", "a", "-o", "x", "--alpha-conv", "1.5"],
                 ["evaluate", "--data", "data/test"], ["routes", *MODEL, "--profile", "p",
                                                        "--classes", "a,b,c", "-o", "r.svg"]):
        code, _, err = call(capsys, *args)
        assert code == cli.EXIT_USAGE and "usage: mdafx" in err, (args, err)


def test_debug_shows_the_traceback(ws, capsys):
    code, _, err = call(capsys, "--debug", "inspect", *MODEL, "--num-classes", "10", *NORM,
                        "-o", "never")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("mdafx: error: ")


def test_keyboard_interrupt_exits_130(ws, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_export", interrupted)
    code, _, err = call(capsys, "export", "whatever.mdafx")
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err


def test_inspect_without_dot_says_so(ws, capsys, monkeypatch):
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    code, out, err = call(capsys, "inspect", "--model", "usermodels:small", *NORM,
                          "--density", "0.5", "-o", "dumps_nodot")
    assert code == 0, err
    assert "Graphviz 'dot' not found: no SVG written" in out
    assert not list((ws["dir"] / "dumps_nodot").rglob("*.svg"))
    assert (ws["dir"] / "dumps_nodot" / "usermodels_small" / "01_prune-channels.txt").is_file()


# ----------------------------------------------------------------------------- accuracy (#6)

def test_analyse_holds_out_a_calibration_split(ws, pipeline):
    out = ok(pipeline["analyse"])
    assert re.search(r"total\s+18\s+3\s+3\b", out), out  # 18 images, 3 profiled, 3 held out
    _, record = cli.load_profile(ws["dir"] / "profile.pt")
    held = record["calibration"]
    assert held["holdout"] == 0.1 and held["images"] == 18 and len(held["indices"]) == 3
    x, y = images(6, seed=0)
    assert sorted(y[held["indices"]].tolist()) == [0, 1, 2]  # one per class


def test_disassemble_to_a_budget_on_calibration_images(ws, pipeline, capsys):
    code, out, err = call(capsys, "disassemble", *MODEL, "--profile", "profile.pt",
                          "--task", "cat,dog", "--max-drop", "0", "--reestimate-norms",
                          "--calibrate", "data/calib", "--search-table", "search.md",
                          "--search-plot", "search.svg", "-o", "budget/cat-dog.mdafx")
    assert code == 0, err
    meta = load_model(ws["dir"] / "budget" / "cat-dog.mdafx").metadata
    assert meta["search"]["met"] and meta["search"]["budget"]["max_acc_drop"] == 0
    cal = meta["calibration"]
    assert cal["images"] == 8 and cal["accuracy"] >= cal["source_accuracy"]  # cat + dog images
    assert meta["norms_reestimated_on"] == 12                   # every class: 4 + 4 + 4
    assert f"{cal['accuracy']:.2%} ({cal['source_accuracy']:.2%})" in out
    # the table's MACs column is the recorded count
    assert f"{meta['macs']:,} ({meta['macs'] / meta['macs_source']:.1%})" in out
    table = (ws["dir"] / "search.md").read_text()
    assert table.startswith("## cat,dog") and "budget met" in table and "| *" in table
    svg = ET.parse(ws["dir"] / "search.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    [panel] = [g for g in svg.iter(f"{ns}g") if g.get("class") == "search"]
    dots = [c.get("class") for c in panel.iter(f"{ns}circle")]
    rows = re.findall(r"^\|\s*\*?\s*\|.*\|\s*(yes|no)\s*\|$", table, re.M)  # scored rows
    assert dots.count("candidate chosen") == 1 and len(dots) <= len(rows)
    assert [line.get("data-limit") for line in panel.iter(f"{ns}line")
            if line.get("class") == "limit"] == ["accuracy"]
    # what the search scored is what evaluate measures on the same images
    code, ev, err = call(capsys, "evaluate", "budget/cat-dog.mdafx", "--data", "data/calib")
    assert code == 0 and re.search(rf"overall\s+8\s+\d+\s+{cal['accuracy']:.2%}", ev), ev


def test_an_unmet_budget_writes_nothing(ws, pipeline, capsys):
    err = expect_error(capsys, r"task cat,dog: BUDGET NOT MET: none of the 27 candidates meets MACs <= "
                             r"0\.1% of the source.*Nothing written; relax the budget",
                       "disassemble", *MODEL, "--profile", "profile.pt", "--task", "cat,dog",
                       "--max-macs", "0.1%", "--calibrate", "data/calib", "-o", "unmet")
    assert "explored thresholds" in err
    assert not (ws["dir"] / "unmet").exists()


def test_calibration_defaults_to_the_held_out_split(ws, capsys):
    code, _, err = call(capsys, "analyse", *MODEL, *NORM, "--data", "data/train",
                        "--holdout", "0.5", "-o", "half.pt")
    assert code == 0, err
    code, out, err = call(capsys, "disassemble", *MODEL, "--profile", "half.pt", "--task",
                          "dog,frog", "--reestimate-norms", "--norm-images", "2",
                          "-o", "held/dog-frog.mdafx")
    assert code == 0, err
    meta = load_model(ws["dir"] / "held" / "dog-frog.mdafx").metadata
    assert "held out of" in meta["calibration"]["data"] and "--holdout 0.5" in out
    assert meta["calibration"]["images"] == 6 and meta["norms_reestimated_on"] == 6
    assert "search" not in meta  # no budget: the given thresholds, re-estimated


def test_calibration_split_missing_or_changed(ws, capsys, tmp_path):
    code, _, err = call(capsys, "analyse", *MODEL, *NORM, "--data", "data/train",
                        "--holdout", "0", "-o", "no_holdout.pt")
    assert code == 0, err
    expect_error(capsys, r"no_holdout\.pt holds no calibration split.*--calibrate DIR",
                 "disassemble", *MODEL, "--profile", "no_holdout.pt", "--task", "cat,dog",
                 "--max-drop", "1", "-o", "never")
    shutil.copytree(ws["dir"] / "data" / "train", tmp_path / "train")
    code, _, err = call(capsys, "analyse", *MODEL, *NORM, "--data", tmp_path / "train",
                        "--holdout", "0.5", "-o", "moved.pt")
    assert code == 0, err
    first = sorted((tmp_path / "train" / "dog").iterdir())[0]
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(first)
    expect_error(capsys, r"changed since moved\.pt was analysed", "disassemble", *MODEL,
                 "--profile", "moved.pt", "--task", "cat,dog", "--max-drop", "1", "-o", "never")
    assert not (ws["dir"] / "never").exists()


def test_budget_flag_usage_errors(ws, capsys):
    base = ["disassemble", *MODEL, "--profile", "profile.pt", "--task", "cat,dog", "-o", "x"]
    for extra in (["--calibrate", "data/calib"], ["--search-table", "t.md"],
                  ["--max-params", "0"], ["--max-macs", "150%"], ["--max-drop", "-1"]):
        code, _, err = call(capsys, *base, *extra)
        assert code == cli.EXIT_USAGE and "usage: mdafx" in err, (extra, err)


def test_finetune_a_component_keeps_its_architecture(ws, pipeline, capsys):
    code, out, err = call(capsys, "finetune", "components/cat-dog.mdafx", "--data",
                          "data/train", "--epochs", "2", "--holdout", "0.5", "--batch-size",
                          "4", "-o", "tuned.mdafx")
    assert code == 0, err
    before = load_model(ws["dir"] / "components" / "cat-dog.mdafx").module.state_dict()
    tuned = load_model(ws["dir"] / "tuned.mdafx")
    after = tuned.module.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ft = tuned.metadata["finetune"]
    assert ft["epochs"] == 2 and ft["teachers"] == 1 and ft["eval_images"] == 6  # 3 + 3 held
    # the norms trained with batch statistics: their running statistics moved
    assert ft["norms_trained"] == 3 and ft["norms_frozen"] == 0 and "3 trained" in out
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])
    assert ft["train_images"] == 6 and tuned.metadata["class_names"] == ["cat", "dog"]
    assert re.search(rf"accuracy after\s+{ft['acc_after']:.2%}", out), out


def test_finetune_an_assembled_model_with_one_teacher_per_source(ws, pipeline, capsys):
    code, out, err = call(capsys, "finetune", "assembled.mdafx", "--data", "data/train",
                          "--eval", "data/test", "--epochs", "1", "-o", "tuned_asm.mdafx")
    assert code == 0, err
    meta = load_model(ws["dir"] / "tuned_asm.mdafx").metadata
    # cat is shared: taught by component 0 only; component 1 still teaches frog
    assert meta["finetune"]["teachers"] == 2 and meta["finetune"]["eval_images"] == 12
    assert meta["finetune"]["train_images"] == 18
    # held-out images from a folder with other class folders (only cat and frog, in that order)
    shutil.copytree(ws["dir"] / "data" / "test" / "cat", ws["dir"] / "two" / "cat")
    shutil.copytree(ws["dir"] / "data" / "test" / "frog", ws["dir"] / "two" / "frog")
    code, out, err = call(capsys, "finetune", "assembled.mdafx", "--data", "data/train",
                          "--eval", "two", "--epochs", "1", "-o", "tuned_two.mdafx")
    assert code == 0, err
    ft = load_model(ws["dir"] / "tuned_two.mdafx").metadata["finetune"]
    assert ft["eval_images"] == 8
    before = load_model(ws["dir"] / "assembled.mdafx")
    x, y = images(4, seed=2)
    keep = np.isin(y, [0, 2])
    logits, _ = predict(before.module, ArrayDataset(x[keep], y[keep], mean=MEAN,
                                                    std=STD).batches(64))
    assert ft["acc_before"] == float((logits.argmax(1) == torch.as_tensor(y[keep])).float()
                                     .mean())
    expect_error(capsys, r"source weights nope\.pt not found", "finetune",
                 "components/cat-dog.mdafx", "--data", "data/train", "--epochs", "1",
                 "--teacher-weights", "nope.pt", "-o", "never.mdafx")
    assert not (ws["dir"] / "never.mdafx").exists()
