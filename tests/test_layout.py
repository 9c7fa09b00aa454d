"""The house rules that keep the package navigable: imports point one way (no circle among
cnnmnist's modules, function-level imports included), the stdlib name lists equal the model
side's registries, and no function grows past what fits on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

import cnnmnist

PACKAGE = Path(cnnmnist.__file__).parent
MAX_LINES = 60  # a function longer than this does several jobs
MAX_PARAMETERS = 7  # more loose parameters than this want a dataclass (Click commands aside)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the cnnmnist modules it imports anywhere in it (functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else node.module for t in targets]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first walk (each reported once, from the module
    first met on it)."""
    found, state, stack = [], {}, []

    def walk(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                walk(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module)
    return found


def test_no_module_imports_itself_through_another():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "cnnmnist.training" in graph["cnnmnist.cli"]  # imported inside `train`
    assert "cnnmnist.preprocess" in graph["cnnmnist.predict"]


def test_the_model_side_knows_nothing_of_training_or_presets():
    graph = import_graph()
    model_side = [m for m in graph if m.startswith("cnnmnist.model")]
    assert model_side
    for module in model_side:
        assert not {
            t for t in graph[module] if t.startswith(("cnnmnist.training", "cnnmnist.presets"))
        }


def test_the_stdlib_name_lists_are_the_registries():
    from cnnmnist import model, presets
    from cnnmnist.model import optimizers

    assert list(presets.ARCHITECTURES) == list(model.ARCHITECTURES)
    assert list(presets.OPTIMIZERS) == list(optimizers.OPTIMIZERS)


def test_functions_fit_on_a_screen():
    too_long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                args = node.args
                loose = [
                    a.arg
                    for a in [*args.posonlyargs, *args.args]
                    if a.arg not in ("self", "cls", "ctx")
                ]
                command = any(
                    isinstance(d, ast.Call) and getattr(d.func, "attr", "") in ("command", "option")
                    for d in node.decorator_list
                )
                if lines > MAX_LINES or (len(loose) > MAX_PARAMETERS and not command):
                    too_long.append(f"{name}.{node.name}: {lines} lines, {len(loose)} parameters")
    assert too_long == []
