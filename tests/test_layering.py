"""The import layering of medgen (docs/ARCHITECTURE.md): walk every import of the package with ast.

data -> models -> training -> pipelines -> cli, with evaluation holding measurements only. Each rule names
a layer and what it must not import; function-level imports count as much as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"medgen": ROOT / "medgen", "medgen.cli": ROOT / "cli"}

# (importing layer, forbidden prefixes)
RULES = [
    ("medgen.models", ["medgen.training", "medgen.pipelines", "medgen.evaluation", "medgen.data",
                       "medgen.checkpoint", "medgen.viz", "medgen.cli", "medgen.outputs", "medgen.console"]),
    ("medgen.data", ["medgen.models", "medgen.training", "medgen.pipelines", "medgen.evaluation",
                     "medgen.checkpoint", "medgen.cli"]),
    ("medgen.training", ["medgen.pipelines", "medgen.evaluation", "medgen.cli"]),
    ("medgen.evaluation", ["medgen.training", "medgen.pipelines", "medgen.checkpoint", "medgen.cli"]),
    ("medgen.checkpoint", ["medgen.training", "medgen.pipelines", "medgen.evaluation", "medgen.cli"]),
    ("medgen.viz", ["medgen.models", "medgen.training", "medgen.pipelines", "medgen.evaluation", "medgen.cli"]),
    ("medgen.pipelines", ["medgen.cli"]),
]
CORE = ["medgen.config", "medgen.errors", "medgen.console", "medgen.runtime", "medgen.outputs", "medgen.bids",
        "medgen.geometry", "medgen.losses"]


def module_name(path: Path) -> str:
    for pkg, base in PACKAGES.items():
        if path.is_relative_to(base):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([pkg, *parts])
    raise ValueError(path)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in `path` names (anywhere in the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from medgen import viz`
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports_of(p) if m.startswith("medgen")}
            for base in PACKAGES.values() for p in sorted(base.rglob("*.py"))}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


GRAPH = graph()


@pytest.mark.parametrize("layer,forbidden", RULES, ids=[r[0] for r in RULES])
def test_layer_imports_only_from_below(layer, forbidden):
    bad = sorted(f"{mod} imports {imp}" for mod, imps in GRAPH.items() if within(mod, layer)
                 for imp in imps for f in forbidden if within(imp, f))
    assert not bad, "\n".join(bad)


def test_core_modules_import_no_layer_above_them():
    layers = ["medgen.data", "medgen.models", "medgen.training", "medgen.evaluation", "medgen.pipelines",
              "medgen.checkpoint", "medgen.viz", "medgen.cli"]
    bad = sorted(f"{mod} imports {imp}" for mod, imps in GRAPH.items() if any(within(mod, c) for c in CORE)
                 for imp in imps if any(within(imp, x) for x in layers))
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_cli():
    """Only the CLI itself and medgen/__main__.py (`python -m medgen`) import medgen.cli."""
    bad = sorted(f"{mod} imports {imp}" for mod, imps in GRAPH.items()
                 if not within(mod, "medgen.cli") and mod != "medgen.__main__"
                 for imp in imps if within(imp, "medgen.cli"))
    assert not bad, "\n".join(bad)


def subpackage(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["medgen", "cli"] else ".".join(parts[:2])


def test_no_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    for mod, imps in GRAPH.items():
        for imp in imps:
            a, b = subpackage(mod), subpackage(imp)
            if a != b and b in {subpackage(m) for m in GRAPH}:
                edges.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_cli_is_imported_as_medgen_cli():
    """cli/ installs as medgen.cli; a top-level `cli` package would collide with other projects'."""
    bad = sorted(f"{mod} imports {imp}" for mod, imps in
                 ((module_name(p), imports_of(p)) for base in PACKAGES.values() for p in base.rglob("*.py"))
                 for imp in imps if imp == "cli" or imp.startswith("cli."))
    assert not bad, "\n".join(bad)


def test_the_walk_sees_the_package():
    assert "medgen.training.loop" in GRAPH and "medgen.cli.main" in GRAPH
    assert "medgen.checkpoint" in GRAPH["medgen.training.loop"]
