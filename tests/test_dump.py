"""Tests for mdafx/dump.py (to_table, to_dot), mdafx/instrument.py (DumpIR, Timing, VerifyEach)
and mdafx/config.py. The small nets and the seeded plans come from test_golden_dumps."""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx
import torch.nn as nn

from mdafx import config
from mdafx.dump import analyze, to_dot, to_table
from mdafx.errors import PassError, PreconditionError
from mdafx.instrument import DumpIR, Timing, VerifyEach, default_instruments, run_pipeline
from mdafx.ir import trace
from mdafx.passmanager import Pass
from mdafx.passes import disassembly_pipeline
from mdafx.passes.shapes import Shapes
from test_golden_dumps import CASES, traced_case


def pruned_case(name: str):
    gm, am, plan = traced_case(name)
    run_pipeline(disassembly_pipeline(plan), gm, am, instruments=[])
    return gm


def opaque(x):
    """A function with no channel rule: ChannelGroups makes it a barrier."""
    return x.roll(1, dims=1)


torch.fx.wrap("opaque")


class BarrierNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(opaque(self.a(x)))


class NoOp(Pass):
    name = "no-op"

    def run(self, gm, am) -> bool:
        return False


class Explode(Pass):
    """Breaks the graph (a Linear that expects 7 features) and then fails."""

    name = "explode"

    def run(self, gm, am) -> bool:
        gm.fc1 = nn.Linear(7, 16)
        raise RuntimeError("boom\nsecond line")


class BreakConv(Pass):
    """Replaces a conv with one of the wrong width and claims success."""

    name = "break-conv"

    def run(self, gm, am) -> bool:
        gm.conv = nn.Conv2d(5, 6, 3, padding=1)
        return True


# ----------------------------------------------------------------------------- to_table / to_dot


@pytest.mark.parametrize("name", list(CASES))
def test_renderings_are_deterministic(name):
    first, second = traced_case(name)[0], traced_case(name)[0]   # two separate traces
    assert to_table(first) == to_table(first) == to_table(second)
    assert to_dot(first) == to_dot(first) == to_dot(second)
    a, b = pruned_case(name), pruned_case(name)
    assert to_table(a) == to_table(b) and to_dot(a) == to_dot(b)


def test_renderings_leave_graph_and_rng_alone():
    gm = pruned_case("residual")
    meta = [(n.name, dict(n.meta)) for n in gm.graph.nodes]
    gm.train()
    rng = torch.get_rng_state()
    to_table(gm), to_dot(gm)
    assert torch.equal(rng, torch.get_rng_state())
    assert gm.training and all(m.training for m in gm.modules())
    for (name, before), node in zip(meta, gm.graph.nodes):
        assert node.name == name and node.meta.keys() == before.keys()
        assert all(node.meta[k] is before[k] for k in before), name


def test_table_shows_pruned_shapes_and_kept_counts():
    table = to_table(pruned_case("residual"))
    # tensor_meta on the pruned graph is stale (8 channels); the view re-runs shapes
    assert re.search(r"^\s*1\s+stem_0\s+call_module\s+Conv2d\s+1x4x8x8\s+4/8\s+g0\s+conv_rule$",
                     table, re.M), table
    assert re.search(r"^\s*9\s+add\s+call_function\s+add\s+1x4x8x8\s+4/8\s+g0\b", table, re.M)


def test_group_labels_follow_coupling_and_concatenation():
    table = to_table(traced_case("cat_split")[0])
    cells = {m[0]: m[1:] for m in re.findall(r"^\s*\d+\s+(\w+)\s+.*\s(\S+)\s+(\S+)\s+\w+_rule",
                                              table, re.M)}
    assert [cells[n] for n in ("a", "b", "cat", "bn")] == [
        ("6", "g0"), ("4", "g1"), ("10", "g0+g1"), ("10", "g0+g1")]
    assert cells["split"] == ("4,6", "g2,g3") and cells["c"] == ("5", "g4")
    assert re.search(r"^\s*0\s+x\s+placeholder\s+x\s+1x3x6x6\s+-\s+frozen\s+-$", table, re.M)


def test_dot_is_a_well_formed_digraph():
    dot = to_dot(pruned_case("cat_split"))
    lines = dot.splitlines()
    assert lines[0] == 'digraph "mdafx" {' and lines[-1] == "}"
    quoted = r'"(?:[^"\\]|\\.)*"'
    attr = rf"\w+=(?:{quoted}|[\w.]+)"
    node_re = re.compile(rf"^  ({quoted}) \[{attr}(?:, {attr})*\];$")
    edge_re = re.compile(rf"^  ({quoted}) -> ({quoted})(?: \[{attr}(?:, {attr})*\])?;$")
    default_re = re.compile(rf"^  (?:node|edge) \[{attr}(?:, {attr})*\];$|^  rankdir=TB; newrank=true; ranksep=0.3; nodesep=0.25;$"
                            rf"|^  subgraph \"cluster_[^\"]+\" \{{$"
                            rf"|^    label={quoted}; style=rounded; color=gray60;$|^  \}}$")
    declared, edges = set(), []
    for line in lines[1:-1]:
        if m := node_re.match(line):
            declared.add(m.group(1))
        elif m := edge_re.match(line):
            edges.append((m.group(1), m.group(2)))
        else:
            assert default_re.match(line), f"not a DOT statement: {line!r}"
    assert edges and all(a in declared and b in declared for a, b in edges)
    for label in re.findall(r'label="((?:[^"\\]|\\.)*)"', dot):   # record braces balance
        unescaped = re.sub(r"\\.", "", label)
        assert unescaped.count("{") == unescaped.count("}")
    # 5 of cat's 10 channels were dropped: a red edge
    assert '"cat" -> "bn" [label="-5", color=red, fontcolor=red];' in dot
    assert dot.count("subgraph") == dot.count("\n  }\n")  # every cluster is closed


def test_inserted_nodes_are_dashed_and_noted():
    gm = pruned_case("cat_split")                     # classes [2, 0]: a reordering getitem
    dot_lines = {line.split(" ", 3)[2]: line for line in to_dot(gm).splitlines()
                 if line.startswith('  "') and " -> " not in line}
    assert 'style="filled,dashed"' in dot_lines['"mdafx_select"']
    assert all("dashed" not in line for name, line in dot_lines.items() if "mdafx_" not in name)
    select = next(line for line in to_table(gm).splitlines() if " mdafx_select " in line)
    assert "inserted" in select


def test_barrier_is_named_in_table_and_dot():
    gm = trace(BarrierNet(), torch.randn(1, 3, 4, 4))
    table, dot = to_table(gm), to_dot(gm)
    line = next(line for line in table.splitlines() if " opaque " in line)
    assert "barrier: no channel rule for opaque" in line and "frozen" in line
    node = next(line for line in dot.splitlines() if line.startswith('  "opaque" ['))
    assert 'color="red"' in node and "no channel rule for opaque" in node


def test_graph_that_does_not_run_is_still_rendered():
    gm = traced_case("flatten_linear")[0]
    gm.fc1 = nn.Linear(7, 16)
    view = analyze(gm)
    assert view.cg is None and "does not run" in view.error
    table = to_table(gm, view=view)
    assert "# shapes and groups as recorded: graph does not run" in table and " fc1 " in table


# ----------------------------------------------------------------------------- DumpIR


def run_dumped(directory, name="flatten_linear", extra=()):
    gm, am, plan = traced_case(name)
    dump_ir = DumpIR(directory, name)
    run_pipeline(disassembly_pipeline(plan) + list(extra), gm, am, instruments=[dump_ir])
    return dump_ir


def test_dump_ir_writes_input_each_pass_and_unchanged_marker(tmp_path):
    dump_ir = run_dumped(tmp_path, extra=[NoOp()])
    names = sorted(p.name for p in (tmp_path / "flatten_linear").iterdir())
    assert names == [".mdafx-dump", "00_input.dot", "00_input.txt", "01_prune-channels.dot",
                     "01_prune-channels.txt", "02_no-op.txt"]
    assert [p.name for p in dump_ir.written] == [
        "00_input.txt", "00_input.dot", "01_prune-channels.txt", "01_prune-channels.dot",
        "02_no-op.txt"]
    marker = (dump_ir.path / "02_no-op.txt").read_text()
    assert re.fullmatch(r"# mdafx \| after no-op \(#02\) \| model flatten_linear \| modified: no "
                        r"\| \d+\.\d{3} s \| unchanged\n", marker)
    head = (dump_ir.path / "01_prune-channels.txt").read_text().splitlines()[:2]
    assert re.fullmatch(r"# mdafx \| after prune-channels \(#01\) \| model flatten_linear \| "
                        r"modified: yes \| \d+\.\d{3} s", head[0])
    assert head[1].startswith("# nodes 9 -> 9   params 1,805 -> ")


def test_dump_ir_writes_failed_file(tmp_path):
    gm, am, plan = traced_case("flatten_linear")
    dump_ir = DumpIR(tmp_path, "m")
    with pytest.raises(PassError, match="pass 'explode' .*ran before: prune-channels"):
        run_pipeline(disassembly_pipeline(plan) + [Explode()], gm, am, instruments=[dump_ir])
    failed = (tmp_path / "m" / "02_explode.FAILED.txt").read_text().splitlines()
    assert re.fullmatch(r"# mdafx \| FAILED explode \(#02\) \| model m \| \d+\.\d{3} s", failed[0])
    assert failed[1].startswith("# nodes 9 -> 9   params ")
    assert failed[2:4] == ["# error: RuntimeError: boom", "#   second line"]
    assert failed[4].startswith("# shapes and groups as recorded: graph does not run")
    assert any(" fc1 " in line for line in failed)
    assert not (tmp_path / "m" / "02_explode.FAILED.dot").exists()


def test_dump_ir_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "flatten_linear").mkdir()
    (tmp_path / "flatten_linear" / "notes.txt").write_text("mine")
    with pytest.raises(PreconditionError, match="not empty and has no .mdafx-dump marker"):
        run_dumped(tmp_path)
    assert [p.name for p in (tmp_path / "flatten_linear").iterdir()] == ["notes.txt"]


def test_dump_ir_reuses_its_own_directory_and_clears_only_its_files(tmp_path):
    run_dumped(tmp_path, extra=[NoOp()])
    own = tmp_path / "flatten_linear"
    (own / "notes.txt").write_text("added by a person")
    run_dumped(tmp_path)                                  # no 02_no-op this time
    names = sorted(p.name for p in own.iterdir())
    assert "02_no-op.txt" not in names and "notes.txt" in names and "00_input.txt" in names
    assert (own / ".mdafx-dump").read_text().splitlines()[1:] == [
        "00_input.txt", "00_input.dot", "01_prune-channels.txt", "01_prune-channels.dot"]


# ----------------------------------------------------------------------------- Timing, VerifyEach


def test_timing_records_each_pass():
    gm, am, plan = traced_case("residual")
    timing = Timing()
    run_pipeline(disassembly_pipeline(plan) + [NoOp()], gm, am, instruments=[timing])
    assert [(i, name, mod) for i, name, mod, _ in timing.records] == [
        (1, "prune-channels", True), (2, "no-op", False)]
    table = timing.table().splitlines()
    assert table[0].split() == ["#", "pass", "modified", "seconds", "share"]
    assert table[1].split()[:3] == ["1", "prune-channels", "yes"]
    assert table[-1].split()[0] == "total"


def test_verify_each_accepts_a_correct_pipeline():
    gm, am, plan = traced_case("cat_split")
    run_pipeline(disassembly_pipeline(plan) + [NoOp()], gm, am, instruments=[VerifyEach()])


def test_verify_each_names_the_pass_and_the_node():
    gm, am, _ = traced_case("flatten_linear")
    # the pass manager refreshes shapes after every transform, so a graph that no longer
    # executes fails right there, naming the pass and the node
    with pytest.raises(PreconditionError) as info:
        run_pipeline([NoOp(), BreakConv()], gm, am, instruments=[VerifyEach()])
    message = str(info.value)
    assert "in pass 'break-conv' (#2; ran before: no-op)" in message
    assert "%conv : [num_users=1] = call_module[target=conv](args = (%x,)" in message


def test_verify_each_runs_the_graph_when_shapes_are_preserved():
    gm, am, _ = traced_case("flatten_linear")

    class BreakQuietly(BreakConv):
        preserves = (Shapes,)

    with pytest.raises(PassError) as info:
        run_pipeline([BreakQuietly()], gm, am, instruments=[VerifyEach()])
    assert "after pass 'break-conv' (#1)" in str(info.value)
    assert "%conv" in str(info.value)


# ----------------------------------------------------------------------------- config


def test_default_instruments_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MDAFX_DUMP", raising=False)
    monkeypatch.delenv("MDAFX_VERIFY", raising=False)
    assert default_instruments("m") == []
    monkeypatch.setenv("MDAFX_DUMP", str(tmp_path))
    monkeypatch.setenv("MDAFX_VERIFY", "1")
    dump_ir, verify = default_instruments("m")
    assert isinstance(dump_ir, DumpIR) and dump_ir.path == tmp_path / "m"
    assert isinstance(verify, VerifyEach)
    monkeypatch.setenv("MDAFX_VERIFY", "maybe")
    with pytest.raises(PreconditionError, match="MDAFX_VERIFY='maybe'"):
        config.verify()


def test_renderings_write_nothing_into_the_graph():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1)), torch.randn(1, 3, 2, 2))
    before = [dict(n.meta) for n in gm.graph.nodes]
    assert " g0 " in to_table(gm)
    assert [dict(n.meta) for n in gm.graph.nodes] == before
