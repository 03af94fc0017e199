"""The public namespace and the import direction of the code.

``mdafx.api`` re-exports every public name (it defines nothing), ``import mdafx`` loads nothing
heavy, and imports only go one way: core <- passes <- instrumentation <- workflows <- api <- CLI.
Tools share ``tools/common.py`` and never import each other.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mdafx import api

ROOT = Path(__file__).resolve().parents[1]

# every module of the distribution, by layer (a module may import its own layer and lower ones)
LAYERS = {
    "core": ["mdafx", "mdafx.errors", "mdafx.config", "mdafx.fileio", "mdafx.ir",
             "mdafx.channels", "mdafx.rules", "mdafx.passmanager", "mdafx.modelfile",
             "mdafx.data", "mdafx.models", "mdafx.training", "mdafx.progress",
             "mdafx.distributed"],
    "passes": ["mdafx.passes"],
    "instrumentation": ["mdafx.instrument", "mdafx.dump"],
    "workflows": ["mdafx.profiling", "mdafx.disassembly", "mdafx.search", "mdafx.recipes",
                  "mdafx.assembly", "mdafx.artifacts", "mdafx.distillation", "mdafx.evaluation",
                  "mdafx.deployment", "mdafx.inspection", "mdafx.decision_routes",
                  "mdafx.synthetic", "mdafx.diagnosis"],
    "api": ["mdafx.api"],
    "cli": ["mdafx.cli"],
}
ORDER = list(LAYERS)


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = ["mdafx", "passes"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            # the package itself is core; its modules each need an entry of their own
            if module == prefix or (prefix != "mdafx" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (layer, prefix)
    return best[0] if best else None


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


SOURCES = sorted(p for folder in ("mdafx", "passes") for p in (ROOT / folder).rglob("*.py"))


def test_every_module_has_a_layer():
    assert [str(p) for p in SOURCES if _layer(_module_of(p)) is None] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    module = _module_of(path)
    mine = ORDER.index(_layer(module))
    wrong = []
    for name, line in _imports(path, module):
        if name == "passes" or name.startswith("passes."):
            wrong.append(f"line {line}: {name} (the package is mdafx.passes)")
            continue
        if not name.startswith("mdafx"):
            continue
        layer = _layer(name)
        if layer is not None and ORDER.index(layer) > mine:
            wrong.append(f"line {line}: {name} ({layer}) from a {ORDER[mine]} module")
    assert wrong == []


def test_api_defines_nothing():
    tree = ast.parse((ROOT / "mdafx" / "api.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == []


@pytest.mark.parametrize("name", sorted(api.__all__))
def test_every_api_name_resolves(name):
    assert getattr(api, name) is not None


def test_no_module_is_named_like_a_function_it_exports():
    clashes = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if path.stem in functions:
            clashes.append(str(path.relative_to(ROOT)))
    assert clashes == []


def test_import_mdafx_is_light():
    code = "import sys, mdafx; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_tools_share_one_helper_module():
    tools = sorted((ROOT / "tools").glob("*.py"))
    names = {p.stem for p in tools}
    for path in tools:
        for name, line in _imports(path, f"tools.{path.stem}"):
            head = name.split(".")[0]
            assert head not in names - {"common"} or head == path.stem, \
                f"{path.name}:{line} imports tool {head}; share code through tools/common.py"
