"""The package's layout holds: no import circle, no upward import, packing and reading apart.

Every ``import`` of a shardkit module by a shardkit module is read from the source (top-level and
inside functions alike: an import moved into a function to dodge a circle is still a circle).
The groups are the module map of ``shardkit/__init__.py``; run this file to check a change.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shardkit"

# Lower groups never import higher ones; "packing" and "reading" never import each other.
GROUPS = {
    "shared": 0,  # the format, the manifest, storage, the cache, errors, small helpers
    "packing": 1,
    "reading": 1,
    "adopting": 2,  # shardkit index: other people's shards, indexed with the reader's pieces
    "top": 3,  # the package's front, command line, benchmarks and the demo
}
READING = {"layout", "plan", "config", "epochs", "resume", "distributed", "state", "loaderlink", "reader",
           "decode", "gpudecode", "modes", "batching", "assembly", "dataset", "loader", "recycle",
           "eagerqueue", "skiplog", "diagnosis", "wds", "access", "fetching"}
ADOPTING = {"indexer"}
TOP = {"__init__", "__main__", "cli", "look"}
# look/ (shardkit show), bottom to top: each module imports only those before it.
LOOK = ("drawing", "choosing", "pictures", "overview", "sheet", "stats", "statspicture", "report")


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "packing":
        return "packing"
    if parts[0] == "bench" or parts[0] in TOP:
        return "top"
    if parts[0] in ADOPTING:
        return "adopting"
    if parts[0] in READING:
        return "reading"
    return "shared"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The shardkit modules that module ``name`` imports (anywhere in it)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "shardkit":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join(target + [alias.name])
                if sub in known:
                    found.add(sub)
                elif ".".join(target) in known:
                    found.add(".".join(target))
                elif not target:
                    found.add("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "shardkit":
                    found.add(".".join(parts[1:]) or "__init__")
    found.discard(name)
    return {m for m in found if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_the_reader_of_imports_sees_the_package(graph):
    assert {"dataset", "reader", "packing", "storage", "__init__"} <= set(graph)
    assert "reader" in graph["dataset"] and "shardformat" in graph["reader"]


def test_the_look_package_is_read_too_and_imports_downward(graph):
    """look/'s modules are in the graph with their imports of each other and of the package's lower
    groups, each named in LOOK, each importing only those before it (never its package's front)."""
    mods = sorted(m for m in graph if m.startswith("look."))
    assert mods == sorted(f"look.{name}" for name in LOOK), "name a new look/ module in LOOK"
    assert {"look.drawing", "look.pictures", "look.choosing"} <= graph["look.sheet"]
    assert "jpegheader" in graph["look.pictures"] and "access" in graph["look.choosing"]
    assert "look.report" in graph["look"]
    rank = {f"look.{name}": i for i, name in enumerate(LOOK)}
    bad = [f"{m} imports {t}" for m in mods for t in sorted(graph[m])
           if t == "look" or (t in rank and rank[t] >= rank[m])]
    assert not bad, "\n".join(bad)


def test_no_import_circle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                circle = stack[stack.index(n):] + [n]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_upward_import_and_packing_and_reading_apart(graph):
    bad = []
    for m, targets in graph.items():
        gm = group(m)
        for t in targets:
            gt = group(t)
            if m.startswith("packing") and t == "packing":
                continue  # a package's modules may use its front
            if GROUPS[gt] > GROUPS[gm] or (GROUPS[gt] == GROUPS[gm] and gt != gm):
                bad.append(f"{m} ({gm}) imports {t} ({gt})")
    assert not bad, "\n".join(sorted(bad))


def test_the_module_map_names_every_module(graph):
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    missing = [m for m in graph if m not in ("__init__", "__main__")
               and m.split(".")[-1] not in doc]
    assert not missing, f"shardkit/__init__.py's module map does not name {missing}"


def test_the_check_can_fail():
    fake = {"a": {"b"}, "b": {"a"}}
    with pytest.raises(AssertionError, match="import circle: a -> b -> a"):
        test_no_import_circle(fake)
    upward = {"shardformat": {"dataset"}, "dataset": set()}
    with pytest.raises(AssertionError, match="shardformat .shared. imports dataset .reading."):
        test_no_upward_import_and_packing_and_reading_apart(upward)
