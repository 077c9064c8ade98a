"""The package layout stays readable: no private names across modules, no import circles, no upward imports.

The import graph is read from every module's AST (top-level and function-level imports both count),
so a lazy import inside a function cannot hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cwca_export"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str) -> str | None:
    """The cwca_export module a dotted import name lands in (longest known prefix)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return [item for item in found if item[0] == "cwca_export" or item[0].startswith("cwca_export.")]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges = set()
        for target, _name, _line in _imports(module, path):
            owner = _owner(target)
            # a package's own __init__ is not an edge of its submodules (importing any
            # submodule runs it); the root package is the lazy public surface
            if owner and owner != module and owner != "cwca_export":
                edges.add(owner)
        graph[module] = edges
    return graph


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_imported_across_modules():
    """Neither a private name nor a private module crosses a module boundary (tests may look inside)."""
    offences = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module, path):
            if name and _private(name) and _owner(target) != module:
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {name} from {target}")
            if any(_private(part) for part in target.split(".")):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports the private module {target}")
    for path in (ROOT / "backends").rglob("*.py"):
        module = "cwca_export.backends." + path.stem if path.name != "__init__.py" else "cwca_export.backends"
        for target, name, line in _imports(module, path):
            if (name and _private(name)) or any(_private(part) for part in target.split(".")):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {name or target} from {target}")
    assert not offences, "\n".join(offences)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    circle = _cycle(_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


STAGES = ["scoring", "planning", "compression", "exporter"]
# stage -> the later stages it may still import, and why
ALLOWED_UPWARD = {
    # measured damage (planning.damage, plan_probe) compresses one block at a time to measure the
    # loss: it runs the registered methods through their public registry, statistics and block runner
    ("planning", "compression"),
}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_no_upward_imports():
    """scoring -> planning -> compression -> export: a stage never imports a later one."""
    offences = []
    for module, edges in _graph().items():
        stage = _stage(module)
        for target in edges:
            other = _stage(target)
            if not (stage and other) or STAGES.index(other) <= STAGES.index(stage):
                continue
            if (stage, other) not in ALLOWED_UPWARD:
                offences.append(f"{module} imports {target}")
    assert not offences, "\n".join(sorted(offences))


def test_the_compression_modules_planning_uses_are_public():
    """What planning reads of compression is the public surface: no private names, no private modules."""
    for module, path in MODULES.items():
        if _stage(module) != "planning":
            continue
        for target, name, line in _imports(module, path):
            if _stage(target) == "compression":
                assert not (name and _private(name)), f"{path.relative_to(ROOT)}:{line} imports {name}"
