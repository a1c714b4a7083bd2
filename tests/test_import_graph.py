"""The import graph of ``megatron/`` has no cycles, and the checkpoint package sits below
training and eval.

Every ``import`` counts, including those inside functions: a lazy import hides a cycle
from the interpreter, not from a reader, who still has to hold both modules in mind.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imported(name: str, path: Path, node, modules) -> list[str]:
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: climb from this module's package
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # `from pkg import mod` imports the module; `from mod import name` the module
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for target in targets:
        while target and target not in modules:  # a name inside a module -> the module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(name, path, node, modules))
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_find_cycle_sees_a_cycle_through_a_package():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_megatron_has_no_import_cycle():
    graph = import_graph()
    assert "megatron.checkpoint" in graph, "the graph should see the checkpoint package"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_megatron_packages_import_in_one_direction():
    """Between packages too: training/ may use eval/ or parallel/, never the reverse."""
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph = {}
    for module, targets in import_graph().items():
        graph.setdefault(package(module), set()).update(
            package(t) for t in targets if package(t) != package(module))
    cycle = find_cycle(graph)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_checkpoint_package_imports_neither_training_nor_eval():
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() if m.startswith("megatron.checkpoint")
                    for t in targets if t.startswith(("megatron.training", "megatron.eval")))
    assert upward == [], f"the checkpoint package must sit below training/ and eval/: {upward}"


def test_nothing_outside_imports_checkpoint_internals():
    """Training, eval, tools and the rest use the package's door, ``megatron.checkpoint``."""
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tools").rglob("*.py"), *ROOT.glob("*.py")]:
        if (PACKAGE / "checkpoint") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("megatron.checkpoint.")]
    assert offenders == [], offenders
