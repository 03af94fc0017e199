"""Golden per-pass dumps (DumpIR) of the disassembly pipeline.

* Three small hand-written nets, each pruned with a fixed seeded plan: every ``.txt`` dump is
  compared whole with ``tests/golden/<model>/``, the timing in the banner line masked.
  ``MDAFX_ACCEPT=1 pytest tests/test_golden_dumps.py`` rewrites them; review the diff.
* torchvision resnet18 at 32×32: FileCheck-style in-order checks of the lines that matter, so
  unrelated changes (a new column, a renamed rule) break less.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mdafx import config
from mdafx.instrument import DumpIR, run_pipeline
from mdafx.ir import trace
from mdafx.passmanager import AnalysisManager
from mdafx.passes import disassembly_pipeline
from mdafx.passes.channel_groups import ChannelGroups
from mdafx.passes.prune_channels import plan_random

GOLDEN = Path(__file__).resolve().parent / "golden"
_TIMING = re.compile(r"\| \d+\.\d+ s\b")


class ResidualNet(nn.Module):
    """A stem, one residual block (the add couples the stem and conv2 outputs), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(torch.relu(x + y)), 1))


class CatSplitNet(nn.Module):
    """Two branches concatenated, normalised, split unevenly, each half convolved, re-joined."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(4, 5, 1)
        self.d = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        left, right = torch.split(x, [4, 6], dim=1)
        x = torch.cat([self.c(left), self.d(right)], dim=1)
        return self.fc(x.mean((2, 3)))


class FlattenLinearNet(nn.Module):
    """Conv features flattened (channel × 4 × 4 positions) into a two-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.flatten(self.pool(torch.relu(self.conv(x))), 1)
        return self.fc2(torch.relu(self.fc1(x)))


# name -> (model class, input shape, plan density, plan seed, classes kept, in order)
CASES = {
    "residual": (ResidualNet, (1, 3, 8, 8), 0.5, 1, None),
    "cat_split": (CatSplitNet, (1, 3, 6, 6), 0.5, 2, [2, 0]),
    "flatten_linear": (FlattenLinearNet, (1, 3, 8, 8), 0.5, 3, [1, 3]),
}


def traced_case(name: str):
    """(traced graph, analysis manager with its ChannelGroups, seeded plan) for ``CASES[name]``."""
    cls, shape, density, seed, classes = CASES[name]
    torch.manual_seed(seed)
    gm = trace(cls(), torch.randn(shape))
    am = AnalysisManager(gm)
    plan = plan_random(am.get(ChannelGroups), density, seed=seed, classes=classes)
    return gm, am, plan


def dump_case(name: str, directory: Path, extra_passes=()) -> DumpIR:
    """Run the disassembly pipeline (plus ``extra_passes``) on a case with DumpIR."""
    gm, am, plan = traced_case(name)
    dump_ir = DumpIR(directory, name)
    run_pipeline(disassembly_pipeline(plan) + list(extra_passes), gm, am, instruments=[dump_ir])
    return dump_ir


def mask_timings(text: str) -> str:
    """Replace the seconds in the banner (first) line; nothing else in a dump is timed."""
    first, _, rest = text.partition("\n")
    return _TIMING.sub("| <t> s", first) + ("\n" + rest if rest else "")


@pytest.mark.parametrize("name", list(CASES))
def test_golden_dump(name, tmp_path):
    dump_ir = dump_case(name, tmp_path)
    produced = {p.name: mask_timings(p.read_text(encoding="utf-8"))
                for p in dump_ir.written if p.suffix == ".txt"}
    golden = GOLDEN / name
    if config.accept():
        golden.mkdir(parents=True, exist_ok=True)
        for old in golden.glob("*.txt"):
            if old.name not in produced:
                old.unlink()
        for file, text in produced.items():
            (golden / file).write_text(text, encoding="utf-8")
        return
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted(golden.glob("*.txt"))}
    assert sorted(produced) == sorted(expected), (
        "dump files differ from the golden ones; if intended, rerun with MDAFX_ACCEPT=1")
    for file, text in produced.items():
        if text != expected[file]:
            diff = "".join(difflib.unified_diff(
                expected[file].splitlines(True), text.splitlines(True),
                f"golden/{name}/{file}", f"produced/{file}"))
            pytest.fail(f"{name}/{file} differs from its golden dump (MDAFX_ACCEPT=1 rewrites "
                        f"it; review the diff):\n{diff}")


# ----------------------------------------------------------------------------- FileCheck


def filecheck(text: str, checks: list[str]) -> None:
    """LLVM FileCheck, minimal: ``CHECK: re`` matches a later line, ``CHECK-NEXT: re`` the very
    next one, ``CHECK-NOT: re`` no line between the previous match and the next one."""
    lines = text.splitlines()
    pos, pending_not = 0, []
    for check in checks:
        kind, _, pattern = check.partition(": ")
        regex = re.compile(pattern)
        if kind == "CHECK-NOT":
            pending_not.append(regex)
            continue
        if kind == "CHECK-NEXT":
            found = pos if pos < len(lines) and regex.search(lines[pos]) else None
        elif kind == "CHECK":
            found = next((i for i in range(pos, len(lines)) if regex.search(lines[i])), None)
        else:
            raise ValueError(f"unknown check {check!r}")
        if found is None:
            near = "\n".join(lines[max(pos - 1, 0):pos + 3])
            raise AssertionError(f"{check!r} not matched after line {pos}; near:\n{near}")
        for bad in pending_not:
            hit = next((line for line in lines[pos:found] if bad.search(line)), None)
            assert hit is None, f"CHECK-NOT {bad.pattern!r} matched {hit!r}"
        pending_not, pos = [], found + 1
    for bad in pending_not:
        hit = next((line for line in lines[pos:] if bad.search(line)), None)
        assert hit is None, f"CHECK-NOT {bad.pattern!r} matched {hit!r}"


def row(idx: int, name: str, op: str, target: str, rest: str = "") -> str:
    """A regex for one table row; ``rest`` continues after the target column."""
    return rf"^\s*{idx}\s+{name}\s+{op}\s+{target}\s+{rest}"


@pytest.fixture(scope="module")
def resnet18_dump(tmp_path_factory):
    from models.zoo import build

    model, example = build("resnet18")
    gm = trace(model, example)
    am = AnalysisManager(gm)
    plan = plan_random(am.get(ChannelGroups), 0.5, seed=0, classes=[5, 3])
    dump_ir = DumpIR(tmp_path_factory.mktemp("dumps"), "resnet18")
    run_pipeline(disassembly_pipeline(plan), gm, am, instruments=[dump_ir])
    return dump_ir.path


def test_resnet18_input_dump(resnet18_dump):
    filecheck((resnet18_dump / "00_input.txt").read_text(), [
        r"CHECK: ^# mdafx \| input \(#00\) \| model resnet18$",
        r"CHECK-NEXT: ^# nodes 71   params 11,181,642   groups \d+$",
        r"CHECK-NEXT: ^\s*idx\s+name\s+op\s+target\s+shape\s+channels\s+group\s+rule\s+notes$",
        "CHECK-NEXT: " + row(0, "x", "placeholder", "x", r"1x3x32x32\s+-\s+frozen"),
        "CHECK-NEXT: " + row(1, "conv1", "call_module", "Conv2d",
                             r"1x64x16x16\s+64\s+g0\s+conv_rule"),
        # the residual stream: every tensor added to it carries conv1's group
        "CHECK: " + row(9, "layer1_0_bn2", "call_module", "BatchNorm2d", r"1x64x8x8\s+64\s+g0"),
        "CHECK-NEXT: " + row(10, "add", "call_function", "add",
                             r"1x64x8x8\s+64\s+g0\s+broadcast_rule"),
        "CHECK: " + row(24, "layer2_0_downsample_0", "call_module", "Conv2d",
                        r"1x128x4x4\s+128\s+g4"),
        "CHECK: " + row(69, "fc", "call_module", "Linear", r"1x10\s+10\s+g\d+\s+linear_rule"),
        "CHECK-NOT: barrier",
        "CHECK-NEXT: " + row(70, "output", "output", "output"),
    ])


def test_resnet18_prune_dump(resnet18_dump):
    filecheck((resnet18_dump / "01_prune-channels.txt").read_text(), [
        r"CHECK: ^# mdafx \| after prune-channels \(#01\) \| model resnet18 \| modified: yes "
        r"\| \d+\.\d+ s$",
        r"CHECK-NEXT: ^# nodes 71 -> 72 \(\+1 inserted\)   params 11,181,642 -> [\d,]+ "
        r"\(-\d+\.\d%\)   groups \d+$",
        # shapes are those of the pruned graph, and agree with kept/total
        "CHECK: " + row(1, "conv1", "call_module", "Conv2d", r"1x(\d+)x16x16\s+\1/64\s+g0\s+"),
        "CHECK: " + row(10, "add", "call_function", "add", r"1x(\d+)x8x8\s+\1/64\s+g0\s+"),
        "CHECK: " + row(69, "fc", "call_module", "Linear", r"1x2\s+2/10\s+"),
        "CHECK-NEXT: " + row(70, "mdafx_select", "call_function", "getitem", r"1x2\s+.*inserted"),
        "CHECK-NEXT: " + row(71, "output", "output", "output", r"1x2\s+"),
    ])
    dot = (resnet18_dump / "01_prune-channels.dot").read_text()
    filecheck(dot, [
        r'CHECK: ^digraph "resnet18 01_prune-channels" \{$',
        r'CHECK: ^  "conv1" \[label="conv1\|Conv2d\|- → \d+/64\|g0"',
        # a residual block is one cluster: its convs, norms and the add
        r'CHECK: ^  subgraph "cluster_layer1.0" \{$',
        r'CHECK-NEXT: ^    label="layer1.0"; style=rounded; color=gray60;$',
        r'CHECK-NEXT: ^  "layer1_0_conv1" \[',
        r'CHECK: ^  "add" \[',
        r'CHECK: ^  \}$',
        r'CHECK: ^  "mdafx_select" \[.*style="filled,dashed"',
        r'CHECK: ^  "conv1" -> "bn1" \[label="-\d+", color=red, fontcolor=red\];$',
    ])
