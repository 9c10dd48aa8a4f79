"""The package layout of docs/ARCHITECTURE.md: no import cycle, the library half never imports the rest."""

import ast
import collections
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flaxformer_lite")
APPLICATION = {"tasks", "train", "evaluation", "generation", "tools"}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for base, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                dotted = "flaxformer_lite." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    graph = collections.defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flaxformer_lite"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[module].add(full if full in modules else node.module)
    return {m: {d for d in graph[m] if d in modules and d != m} for m in modules}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_library_half_never_imports_the_application_half():
    wrong = [
        (m, d)
        for m, deps in _graph().items()
        for d in deps
        if _folder(m) not in APPLICATION and _folder(d) in APPLICATION
    ]
    assert not wrong, wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles found by a depth-first walk (each as the modules along it)."""
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    assert not _cycles(_graph())


def test_the_cycle_check_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert not _cycles({"a": {"b"}, "b": set()})
