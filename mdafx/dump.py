"""Text and DOT renderings of a graph for per-pass dumps (pure and deterministic).

Both renderings describe a *view* of the graph: the graph with its shapes (``tensor_meta``,
kept current by the pass manager) and its channel groups (the ``ChannelGroups`` analysis, from
the analysis manager when a pipeline runs). Nothing is copied or recomputed behind the pass
manager's back; ``mdafx.kept`` (written by PruneChannels) is read from the nodes.

Determinism: rows follow graph order, group labels are numbered by first appearance, colours come
from an md5 of the target, and nothing depends on ``id()``, time or dict order other than the
graph's own. Two separately traced copies of a model give byte-identical text.

Group labels name the set of channel roots a tensor holds (``cg.roots``): ``g<k>`` for a new set,
the same label wherever the same set appears again (after BN, ReLU, a residual add, flatten),
``g1+g4`` for a concatenation of up to four known sets, ``frozen`` when every channel is frozen.

>>> import torch
>>> from mdafx.ir import trace
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
>>> print(to_table(trace(net, torch.randn(1, 3, 2, 2))), end="")
  idx  name     op           target    shape    channels    group    rule        notes
    0  input_1  placeholder  input     1x3x2x2  -           frozen   -
    1  _0       call_module  Conv2d    1x4x2x2  4           g0       conv_rule
    2  _1       call_module  ReLU      1x4x2x2  4           g0       unary_rule
    3  output   output       output    1x4x2x2  4           g0       output
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from tabulate import tabulate

from mdafx.channels import FROZEN, varying_dims
from mdafx.ir import META_KEPT
from mdafx.passes.channel_groups import ChannelGraph, ChannelGroups

__all__ = ["View", "analyze", "to_table", "to_dot", "INSERTED_PREFIX"]

INSERTED_PREFIX = "mdafx_"      # nodes that mdafx passes insert (STYLE.md: mdafx_pad_<n>, ...)
MAX_CAT_PARTS = 4               # longer concatenations get a fresh label instead of g1+g2+...
COLUMNS = ("idx", "name", "op", "target", "shape", "channels", "group", "rule", "notes")


@dataclass
class View:
    """A graph and its channel groups (``cg`` is None, and ``error`` says why, when they could not
    be computed, e.g. on the graph a failing pass left behind)."""

    gm: fx.GraphModule
    cg: ChannelGraph | None = None
    error: str | None = None


def analyze(gm: fx.GraphModule, am: Any = None) -> View:
    """The view of ``gm``: its channel groups from ``am`` (an ``AnalysisManager``) or computed
    afresh. The graph is run once on a random input when they are computed; it is not changed."""
    try:
        cg = am.get(ChannelGroups) if am is not None else ChannelGroups().compute(gm)
    except Exception as e:
        return View(gm, None, f"graph does not run: {type(e).__name__}: {_first_line(e)}")
    return View(gm, cg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ----------------------------------------------------------------------------- rows


@dataclass
class _Labels:
    """Stable labels for sets of channel roots, numbered by first appearance."""

    known: dict[frozenset, str] = field(default_factory=dict)
    count: int = 0

    def label(self, roots: torch.Tensor) -> str:
        key = frozenset(torch.unique(roots).tolist())
        if key == frozenset({FROZEN}):
            return "frozen"
        if key in self.known:
            return self.known[key]
        label = self._as_concat(key) or f"g{self.count}"
        if label == f"g{self.count}":
            self.count += 1
        self.known[key] = label
        return label

    def _as_concat(self, key: frozenset) -> str | None:
        rest, parts = set(key), []
        if FROZEN in rest:
            rest.discard(FROZEN)
            parts.append("frozen")
        for known, label in self.known.items():
            if "+" not in label and known and known <= rest:
                parts.append(label)
                rest -= known
        if rest or not 2 <= len(parts) <= MAX_CAT_PARTS:
            return None
        return "+".join(parts)


def _target(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(node.target)).__name__
        except AttributeError:
            return f"{node.target} (missing)"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _shape(tm: Any) -> str:
    if tm is None:
        return "-"
    if hasattr(tm, "shape"):
        return "x".join(str(s) for s in tm.shape) if len(tm.shape) else "scalar"
    if isinstance(tm, (tuple, list)):
        return "(" + ", ".join(_shape(t) for t in tm) + ")"
    if isinstance(tm, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in tm.items()) + "}"
    return "-"


@dataclass(frozen=True)
class _Row:
    idx: int
    name: str
    op: str
    target: str
    shape: str
    channels: str
    kept: tuple[int, int] | None    # (kept, total) when pruning changed the count
    group: str
    rule: str
    barrier: str
    inserted: bool

    @property
    def notes(self) -> str:
        notes = ["inserted"] if self.inserted else []
        if self.barrier:
            notes.append(f"barrier: {self.barrier}")
        return "; ".join(notes)

    def cells(self) -> list[str]:
        return [str(self.idx), self.name, self.op, self.target, self.shape, self.channels,
                self.group, self.rule, self.notes]


def _count(roots: torch.Tensor) -> str:
    """Channels along the one dim where roots vary (``cg.channel_dim``), "-" if none does."""
    dims = varying_dims(roots)
    return str(roots.shape[dims[-1]]) if dims else "-"


def _rows(view: View) -> list[_Row]:
    gm, cg = view.gm, view.cg
    labels = _Labels()
    rows = []
    for idx, node in enumerate(gm.graph.nodes):
        roots = cg.roots(node.name) if cg is not None and node.name in cg.ids else None
        kept = node.meta.get(META_KEPT)
        kept = (int(kept[0]), int(kept[1])) if kept is not None else None
        if isinstance(roots, torch.Tensor):
            group = labels.label(roots)
            count = _count(roots)
        elif isinstance(roots, tuple):
            parts = [(labels.label(r), _count(r)) if isinstance(r, torch.Tensor) else ("-", "-")
                     for r in roots]
            group, count = ",".join(p[0] for p in parts), ",".join(p[1] for p in parts)
        else:
            group = "?" if cg is None else "-"
            count = "-"
        channels = f"{kept[0]}/{kept[1]}" if kept is not None else count
        rows.append(_Row(idx, node.name, node.op, _target(node, gm),
                         _shape(node.meta.get("tensor_meta")), channels,
                         kept if kept is not None and kept[0] < kept[1] else None, group,
                         cg.rules.get(node.name, "-") if cg is not None else "-",
                         cg.barriers.get(node.name, "") if cg is not None else "",
                         node.name.startswith(INSERTED_PREFIX)))
    return rows


def group_count(view: View) -> int:
    """Distinct non-frozen, non-concatenated group labels of ``view``."""
    return len({r for row in _rows(view) for r in row.group.split(",") if r.startswith("g")
                and "+" not in r})


# ----------------------------------------------------------------------------- renderings


def to_table(gm: fx.GraphModule, title_lines: tuple[str, ...] | list[str] = (),
             view: View | None = None) -> str:
    """One row per node: ``idx name op target shape channels group rule notes``.

    ``channels`` is ``kept/total`` after PruneChannels, else the size of the node's channel dim;
    ``notes`` names barriers and nodes mdafx inserted. ``view`` reuses an ``analyze(gm)``.
    """
    view = view or analyze(gm)
    lines = list(title_lines)
    if view.error:
        lines.append(f"# shapes and groups as recorded: {view.error}")
    table = tabulate([r.cells() for r in _rows(view)], headers=COLUMNS, tablefmt="plain",
                     disable_numparse=True, colalign=("right",) + ("left",) * (len(COLUMNS) - 1))
    lines.append("\n".join(line.rstrip() for line in table.splitlines()))
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """Escape DOT record-label metacharacters."""
    out = []
    for ch in text:
        if ch in '{}|<>"\\':
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _colour(target: str) -> str:
    """A stable HSV fill colour for ``target`` (same op, same colour, across runs)."""
    h = int(hashlib.md5(target.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return f"{h:.3f} 0.300 0.950"


def _blocks(nodes: list[fx.Node]) -> dict[str, str]:
    """``node name -> block``: a layer call's block is its module path without the last atom
    (``layer1.0.conv1`` -> ``layer1.0``); any other node joins the block of the node before it
    when its first input is in that block (the residual ``add`` of ``layer1.0``)."""
    out: dict[str, str] = {}
    previous: str | None = None
    for node in nodes:
        block = None
        if node.op == "call_module" and "." in str(node.target):
            block = str(node.target).rsplit(".", 1)[0]
        elif (node.op in ("call_function", "call_method") and previous is not None
              and node.all_input_nodes and out.get(node.all_input_nodes[0].name) == previous):
            block = previous
        if block is not None:
            out[node.name] = block
        previous = block
    return out


def to_dot(gm: fx.GraphModule, view: View | None = None, name: str = "mdafx") -> str:
    """Graphviz DOT: one record per node (``name | target | in→out ch | group``).

    Fill colour hashes the target; nodes mdafx inserted have dashed borders; barriers have a
    thick red border; an edge whose source lost channels is labelled ``-<dropped>`` (red when
    any were dropped). Consecutive nodes of one block (:func:`_blocks`) are drawn in one
    cluster box labelled with the block's module path, so a deep network reads block by block.
    """
    view = view or analyze(gm)
    rows = {r.name: r for r in _rows(view)}
    lines = [f'digraph "{_escape(name)}" {{',
             "  rankdir=TB; newrank=true; ranksep=0.3; nodesep=0.25;",
             '  node [shape=record, style=filled, fontname="monospace", fontsize=10];',
             '  edge [fontname="monospace", fontsize=9];']
    if view.error:
        lines.append(f'  label="{_escape("shapes and groups as recorded: " + view.error)}";')
    nodes = list(view.gm.graph.nodes)
    blocks = _blocks(nodes)
    current = None
    for node in nodes:
        block = blocks.get(node.name)
        if block != current:  # nodes of one block are consecutive in graph order
            if current is not None:
                lines.append("  }")
            if block is not None:
                lines += [f'  subgraph "cluster_{_escape(block)}" {{',
                          f'    label="{_escape(block)}"; style=rounded; color=gray60;']
            current = block
        row = rows[node.name]
        ins = [rows[a.name].channels for a in node.all_input_nodes if a.name in rows]
        in_ch = ",".join(ins) if ins else "-"
        # one row per node (fields side by side): a deep network is a third as tall
        label = "|".join(_escape(s) for s in (
            row.name, row.target, f"{in_ch} → {row.channels}", row.group))
        attrs = [f'label="{label}"', f'fillcolor="{_colour(row.op + ":" + row.target)}"']
        if row.inserted:
            attrs.append('style="filled,dashed"')
        if row.barrier:
            attrs += ['color="red"', "penwidth=2.5",
                      f'tooltip="{_escape("barrier: " + row.barrier)}"']
        lines.append(f'  "{node.name}" [{", ".join(attrs)}];')
    if current is not None:
        lines.append("  }")
    for node in nodes:
        for src in node.all_input_nodes:
            kept = rows[src.name].kept if src.name in rows else None
            dropped = None if kept is None else kept[1] - kept[0]
            label = (f' [label="-{dropped}", color=red, fontcolor=red]' if dropped
                     else f' [label="-{dropped}"]' if dropped is not None else "")
            lines.append(f'  "{src.name}" -> "{node.name}"{label};')
    lines.append("}")
    return "\n".join(lines) + "\n"
