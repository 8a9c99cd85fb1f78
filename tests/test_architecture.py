"""The import graph of src/spo_align, read with the standard library's `ast`: no import circle between modules, no
package importing a package above it, and the run folder entered only through its entry point.

Every import counts, in all three checks: at module level, inside a function (a lazy import of a heavy library
is fine, but it is still an arrow: it may neither climb nor close a circle) and under `if TYPE_CHECKING:` (an
annotation's import is an arrow a reader follows too). No import is exempt.

Run it alone to see the graph's numbers: `python tests/test_architecture.py`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "spo_align"

LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves: the package itself, the recipe sections' base, the tiny task, the packaged real model, OS error wording
    ("__init__", "section", "tiny", "packaged_model", "os_errors"),
    ("losses",),  # each loss's section, tensor function and entry; the registry
    ("recipe",),  # schema (its loss union built from the registry), load, checks, resolve
    ("data",),  # read, canonical shape, tokenize, row policies, packing, batch collation
    ("run_folder",),  # the output folder: claim, checkpoints, run.json, card, hash, disk, metrics.jsonl
    ("plots",),  # training curves (reads run folders)
    ("train",),  # launch -> run -> stages -> finish, and the trainers
    ("eval",),  # generate, judge, tabulate
    ("experiment",),  # SFT -> preference runs -> eval -> tables, above train and eval
    ("cli",),  # the `spo` command
)
"""Bottom to top. A unit is a subpackage or a top-level module of spo_align; a unit may import only units of
the layers below its own (and itself)."""

ENTRY_POINTS = {"run_folder": f"{PACKAGE}.run_folder"}
"""Packages that other units may import only through one module."""


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    lazy: bool
    type_checking: bool


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module if known[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    # `from pkg import sub` imports the module pkg.sub when there is one
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]


def imports() -> list[Import]:
    known = modules()
    found: list[Import] = []

    def visit(node: ast.AST, module: str, lazy: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, module, True, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), module, lazy, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), module, lazy, type_checking)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, known):
                    if target == PACKAGE or target.startswith(PACKAGE + "."):
                        found.append(Import(module, target, child.lineno, lazy, type_checking))
            else:
                visit(child, module, lazy, type_checking)

    for module, path in known.items():
        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), module, False, False)
    return found


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(name: str) -> int:
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"{PACKAGE}.{name} is in no layer of tests/test_architecture.py: give it one")


def circles(edges: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(set(graph) | {e.target for e in edges}):
        if node not in index:
            connect(node)
    return found


def climbs(edges: list[Import]) -> list[str]:
    wrong = []
    for edge in edges:
        source, target = unit(edge.source), unit(edge.target)
        if source != target and rank(target) >= rank(source):
            kind = "TYPE_CHECKING" if edge.type_checking else "lazy" if edge.lazy else "module-level"
            wrong.append(f"{edge.source}:{edge.line} imports {edge.target} ({kind}): {source} is not above {target}")
    return wrong


def entry_point_bypasses(edges: list[Import]) -> list[str]:
    wrong = []
    for edge in edges:
        entry = ENTRY_POINTS.get(unit(edge.target))
        if entry is not None and unit(edge.source) != unit(edge.target) and edge.target != entry:
            wrong.append(f"{edge.source}:{edge.line} imports {edge.target}: other packages use {entry} only")
    return wrong


def test_every_unit_has_a_layer() -> None:
    for module in modules():
        rank(unit(module))


def test_no_import_circle_between_modules() -> None:
    assert circles(imports()) == []


def test_no_package_imports_one_above_it() -> None:
    assert climbs(imports()) == []


def test_other_packages_enter_the_run_folder_through_its_entry_point() -> None:
    assert entry_point_bypasses(imports()) == []


def test_the_checks_see_a_circle_a_climb_and_a_bypass() -> None:
    """The three checks above fail on the faults they exist for (so an empty answer means something)."""
    a, b = f"{PACKAGE}.data.sources", f"{PACKAGE}.data.json_rows"
    assert circles([Import(a, b, 1, False, False), Import(b, a, 2, True, False)]) == [sorted([a, b])]
    assert circles([Import(a, b, 1, False, False)]) == []
    climb = Import(f"{PACKAGE}.plots.metrics", f"{PACKAGE}.train.callbacks", 3, True, False)
    assert climbs([climb]) == [
        f"{PACKAGE}.plots.metrics:3 imports {PACKAGE}.train.callbacks (lazy): plots is not above train"
    ]
    bypass = Import(f"{PACKAGE}.train.run", f"{PACKAGE}.run_folder.lifecycle", 4, False, True)
    assert entry_point_bypasses([bypass]) and not entry_point_bypasses(
        [Import(f"{PACKAGE}.run_folder.card", f"{PACKAGE}.run_folder.layout", 5, False, False)]
    )


def main() -> int:
    edges = imports()
    inner = [e for e in edges if unit(e.source) == unit(e.target)]
    print(f"{len(modules())} modules, {len(edges)} imports of {PACKAGE}: {len(edges) - len(inner)} between units, "
          f"{sum(e.lazy for e in edges)} inside functions, {sum(e.type_checking for e in edges)} under TYPE_CHECKING")
    for index, layer in enumerate(LAYERS):
        users = sorted({unit(e.source) for e in edges if unit(e.target) in layer and unit(e.source) not in layer})
        print(f"  {index}: {', '.join(layer):<28} used by {', '.join(users) or '-'}")
    problems = [*map(str, circles(edges)), *climbs(edges), *entry_point_bypasses(edges)]
    for problem in problems:
        print("  " + problem)
    print("no circle, no climb, no bypass" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
