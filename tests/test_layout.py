"""The shape of the house, checked from the source (ast, nothing imported): no import cycle in the
package (imports inside functions count), no function over 60 lines, and the README's layout
section names what is in the tree."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PKG = ROOT / "internlm2_tp"
MAX_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its body (a package's __init__
    counts as imported with any of its modules)."""
    mods = modules()

    def owner(name: str) -> str | None:        # the module `name` lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        here = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in filter(None, map(owner, targets)):
                parts = t.split(".")
                for i in range(1, len(parts) + 1):          # the packages on the way, too
                    dep = ".".join(parts[:i])
                    if dep in mods and dep != m and not m.startswith(dep + "."):
                        graph[m].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "internlm2_tp.errors" in graph["internlm2_tp.cli"]          # the graph is read
    assert "internlm2_tp.runtime.driver" not in graph["internlm2_tp.cli"]
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_over_60_lines() -> None:
    long = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def layout_paths(block: str) -> set[str]:
    """The paths a layout block names: the first column of each line (several names separated by
    commas), indented entries relative to the folder above them, continuation lines skipped."""
    paths, folder = set(), ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 4:
            continue
        names = [n.strip() for n in re.split(r"\s{2,}", line.strip())[0].split(",")]
        if indent == 0:
            folder = names[0] if len(names) == 1 and names[0].endswith("/") else ""
            paths.update(names)
        else:
            paths.update(folder + n for n in names)
    return paths


def test_readme_layout_names_the_tree() -> None:
    text = (ROOT / "README.md").read_text()
    paths = layout_paths(text.split("\n## Layout\n", 1)[1].split("```")[1])
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"the README layout names what is not in the tree: {missing}"
    entries = {p.name + "/" * p.is_dir() for p in PKG.iterdir()
               if p.name not in ("__init__.py", "__pycache__")}
    unnamed = sorted(e for e in entries if not any(x == f"internlm2_tp/{e}" or
                                                   x.startswith(f"internlm2_tp/{e}")
                                                   for x in paths))
    assert not unnamed, f"the README layout does not name internlm2_tp/{unnamed}"
    assert {"internlm2_tp/engine/", "jobs/batch_infer.py", "conf/batch_infer.yaml"} <= paths
