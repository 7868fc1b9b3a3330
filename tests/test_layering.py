"""The import graph keeps its layers (read with ``ast``; imports inside functions and module names
given to ``importlib.import_module`` count too):

- ``r1v3.chat`` and ``r1v3.encoding`` are the bottom: prompt rendering and encoding;
- ``r1v3.rl`` and ``r1v3.data_modules`` never import ``stages`` or ``callbacks``, and ``rl`` never
  imports ``data_modules``;
- only the CLI and the user tools (``r1v3.tools``) import ``callbacks``;
- no module imports itself back through others (no cycles).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Source folders and the package names they install as (pyproject's package-dir).
PACKAGES = {"r1v3": REPO / "r1v3", "r1v3.data_modules": REPO / "data_modules", "r1v3.callbacks": REPO / "callbacks"}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.setdefault(".".join([prefix, *parts]), path)
    return found


def imported_names(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(name, path):
            while imported and imported not in mods:  # "pkg.module.attr" → "pkg.module"
                imported = imported.rpartition(".")[0]
            # A package's own __init__ is no layer of its own: importing r1v3 itself says nothing.
            if imported and imported != name and imported not in PACKAGES and imported != "r1v3.rl":
                targets.add(imported)
        edges[name] = targets
    return edges


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_layers():
    edges = graph()
    assert len(edges) > 40, "the scan found the package"
    wrong = []
    for source, targets in edges.items():
        for target in targets:
            if (under(source, "r1v3.rl") or under(source, "r1v3.data_modules")) and (
                    under(target, "r1v3.stages") or under(target, "r1v3.callbacks")):
                wrong.append(f"{source} -> {target}: rl/ and data_modules/ sit below the stages and callbacks")
            if under(source, "r1v3.rl") and under(target, "r1v3.data_modules"):
                wrong.append(f"{source} -> {target}: rl/ does not use data_modules/ (encoding is r1v3.encoding)")
            if under(target, "r1v3.callbacks") and not (
                    under(source, "r1v3.callbacks") or source == "r1v3.cli" or under(source, "r1v3.tools")):
                wrong.append(f"{source} -> {target}: only the CLI and the user tools import callbacks")
            if under(source, "r1v3.encoding") or under(source, "r1v3.chat"):
                if target not in ("r1v3.errors", "r1v3.chat"):
                    wrong.append(f"{source} -> {target}: the encoding layer is the bottom")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_scan_sees_lazy_and_dynamic_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from r1v3.stages import grpo\n    importlib.import_module('r1v3.callbacks.kl_monitor')\n")
    names = imported_names("r1v3.rl.m", source)
    assert {"r1v3.stages.grpo", "r1v3.callbacks.kl_monitor"} <= names
