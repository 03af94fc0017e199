"""The README walk-through (tools/walkthrough.sh) runs as written, on a scaled-down copy of the
shared CIFAR-10 folder: the first TRAIN images of every class for training, TEST for testing
(symlinks), PER_CLASS=4 profiled samples. The commands are the README's; only the data is small."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mdafx import api

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "walkthrough.sh"
TRAIN, TEST = 40, 10

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _cifar() -> Path:
    root = os.environ.get("MDAFX_DATA")
    if not root or not (Path(root) / "cifar10" / "train").is_dir():
        pytest.skip("set MDAFX_DATA to the folder holding cifar10/ (.ci/run does)")
    return Path(root) / "cifar10"


def _subset(src: Path, dst: Path, per_class: int) -> None:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (dst / cls.name / f.name).symlink_to(f)


def test_readme_walkthrough_runs_as_written(tmp_path):
    cifar = _cifar()
    data = tmp_path / "cifar10"
    _subset(cifar / "train", data / "train", TRAIN)
    _subset(cifar / "test", data / "test", TEST)
    # `mdafx` on PATH as the installed entry point would be, for this interpreter
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "mdafx"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mdafx.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "DATA": str(data), "OUT": str(tmp_path / "out"), "PER_CLASS": "4"}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    asm = api.load(out / "assembled.mdafx")
    assert asm.class_names == ["cat", "dog", "airplane", "ship"]
    assert (out / "assembled.onnx").is_file() and any((out / "dumps").iterdir())
    assert "onnxruntime" in run.stdout and "wrote" in run.stdout


def _readme_python_api() -> str:
    """The code block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """The README's API block, in a folder holding the small cifar10/ copy; only the number of
    profiled samples per class is scaled down (50 -> 4) to fit TRAIN images per class."""
    cifar = _cifar()
    _subset(cifar / "train", tmp_path / "cifar10" / "train", TRAIN)
    _subset(cifar / "test", tmp_path / "cifar10" / "test", TEST)
    code = _readme_python_api()
    assert "per_class=50" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("per_class=50", "per_class=4"), "README.md", "exec"), namespace)
    comp, asm = namespace["comp"], namespace["asm"]
    other = namespace["other"]  # no recipe, no images: the CLI's default and the held-out split
    assert comp.metadata["recipe"]["name"] == other.metadata["recipe"]["name"] == "default"
    assert other.metadata["calibration"]["images"] > 0
    assert asm.class_names == ["cat", "dog", "airplane", "ship"]
    assert (tmp_path / "vgg-cat-dog.mdafx").is_file() and (tmp_path / "assembled.onnx").is_file()
