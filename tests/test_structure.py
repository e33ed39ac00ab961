"""The package's shape (issue 13): no import cycles, and no PEFT method named outside adapters/.

Both read the source with ``ast``; nothing is imported.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "metapeft"
# Spelled out rather than imported from metapeft.adapters: the test must not trust the registry
# it is checking. A new method is added here too.
METHOD_NAMES = {"lora", "dora", "adalora", "prompt", "prefix", "ptuning", "prototype"}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imported(node, module: str, is_package: bool) -> list[str]:
    """The metapeft modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # from . import x / from .mod import x
        parts = module.split(".")
        base = parts if is_package else parts[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the metapeft modules it imports. Every import counts, at module level or inside
    a function (as ../shared/hooks/check-structure.py counts them): a lazy import still makes the
    two modules depend on each other. A module importing its own parent package is no edge."""
    mods = _modules()
    graph = {}
    for m, f in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _imported(node, m, f.name == "__init__.py"):
                    if t in mods and t != m and not m.startswith(t + "."):
                        edges.add(t)
        graph[m] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, done = [], set()

    def visit(u, stack):
        stack.append(u)
        for v in sorted(graph[u]):
            if v in stack:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in done:
                visit(v, stack)
        stack.pop()
        done.add(u)

    for m in sorted(graph):
        if m not in done:
            visit(m, [])
    return cycles


def test_import_graph_has_no_cycles():
    graph = import_graph()
    assert "metapeft.cli" in graph and "metapeft.api" in graph["metapeft.cli.adapt"]
    assert find_cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_nothing_below_the_api_imports_it():
    """api is the front door: only the CLI and the quickstart demo (its clients) import it."""
    users = {m for m, ts in import_graph().items() if "metapeft.api" in ts}
    assert users <= {"metapeft.quickstart"} | {m for m in users if m.startswith("metapeft.cli")}


def _method_literals(path: Path) -> list[str]:
    """``file:line 'name'`` for every string constant that is exactly a method name (f-string
    parts included; docstrings and comments are prose, not constants equal to a name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(SRC.parent)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.strip().lower() in METHOD_NAMES]


def test_no_method_name_outside_adapters():
    """Method knowledge lives in adapters/ (its registry in adapters/__init__.py): elsewhere a
    method is a value passed in, or adapters.DEFAULT_METHOD / PRIOR_ORDER / PROBE_METHOD."""
    leaks = [hit for f in sorted(SRC.rglob("*.py")) if "adapters" not in f.relative_to(SRC).parts
             for hit in _method_literals(f)]
    assert leaks == []


def test_the_literal_check_sees_literals():
    f = SRC / "adapters" / "__init__.py"
    assert any("'lora'" in hit for hit in _method_literals(f))
