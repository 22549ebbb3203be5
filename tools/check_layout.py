"""Checks of the package's shape that anyone can rerun: ``python tools/check_layout.py [--max-lines 120]``.

1. Imports, read with ``ast`` (lazy imports inside functions count; ``if TYPE_CHECKING:`` blocks do not):
   the library packages (``data``, ``models``, ``sample``, ``train``, ``evaluate``) never import the front ends
   (``api``, ``cli``, ``web``, ``demo``), and the packages of ``sdtrain`` form no import cycle.
2. No function in ``src/`` is longer than ``--max-lines`` lines (``--list`` prints the longest ones).

Exits 1 naming what breaks a rule, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LIBRARY = ("data", "models", "sample", "train", "evaluate")
FRONT_ENDS = ("api", "cli", "web", "demo")


def _unit(module: str) -> str:
    """``sdtrain.train.loop`` -> ``train``; ``sdtrain.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, module: str) -> set[str]:
    """The ``sdtrain`` modules that ``path`` imports, at any depth but type-checking blocks."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("sdtrain"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + [base]).strip(
                        "."
                    )
                if base.startswith("sdtrain"):
                    for a in child.names:  # `from sdtrain import api` names a module, `... import check_torch` not
                        named = SRC / "sdtrain" / a.name
                        is_module = named.with_suffix(".py").is_file() or named.is_dir()
                        found.add(f"{base}.{a.name}" if base == "sdtrain" and is_module else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    """Unit -> the units it imports (units: the sub-packages and top-level modules of ``sdtrain``)."""
    edges: dict[str, set[str]] = {}
    for path in sorted((SRC / "sdtrain").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        unit = _unit(module)
        targets = {_unit(m) for m in imports(path, module)} - {unit, "sdtrain"}
        edges.setdefault(unit, set()).update(targets)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's node list found by depth-first search (each reported once, from its smallest node)."""
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                found.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return found


def long_functions(limit: int) -> list[tuple[int, str]]:
    """``(lines, file:line name)`` of every function longer than ``limit`` lines, longest first."""
    rows = []
    for path in sorted((SRC / "sdtrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    rows.append((length, f"{path.relative_to(SRC)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lines", type=int, default=120, help="the longest function allowed")
    parser.add_argument("--list", type=int, default=0, help="also print the N longest functions")
    args = parser.parse_args(argv)
    edges, failures = graph(), []
    for unit in LIBRARY:
        for front in sorted(edges.get(unit, set()) & set(FRONT_ENDS)):
            failures.append(f"{unit} imports the front end {front}")
    failures += ["import cycle: " + " -> ".join(c) for c in cycles(edges)]
    failures += [f"{n} lines: {where}" for n, where in long_functions(args.max_lines)]
    for unit in sorted(edges):
        print(f"{unit:>9} -> {', '.join(sorted(edges[unit])) or '-'}")
    if args.list:
        print(*(f"{n:4d} {where}" for n, where in long_functions(0)[: args.list]), sep="\n")
    print(*failures, sep="\n") if failures else print("ok: no front-end imports, no cycles, no function over "
                                                       f"{args.max_lines} lines")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
