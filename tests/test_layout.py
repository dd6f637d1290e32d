"""The shape of core/: imports flow one way (scripts -> stages -> models and services), with no cycle, no
stage importing another stage, and no import hidden inside a function."""
import ast
from pathlib import Path

from conftest import ROOT

CORE = ROOT / "core"
# optional heavy dependencies may be imported where they are used; nothing else is
LAZY_ALLOWED: set[str] = set()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def core_imports() -> dict[str, set[str]]:
    """Each core module and the core modules it imports."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("core"):
                targets |= {t for t in [node.module] + [f"{node.module}.{a.name}" for a in node.names] if t in modules}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_core_has_no_import_cycle():
    cycle = find_cycle(core_imports())
    assert cycle is None, " -> ".join(cycle)


def test_models_import_only_models_and_config():
    """A model file never opens a file or parses a flag: it reads nothing from stages or services."""
    for name, targets in core_imports().items():
        if name.startswith("core.models"):
            outside = {t for t in targets if not t.startswith("core.models") and t not in ("core", "core.config")}
            assert not outside, f"{name} imports {outside}"


def test_services_do_not_import_stages():
    for name, targets in core_imports().items():
        if not name.startswith("core.stages"):
            assert not {t for t in targets if t.startswith("core.stages")}, name


def test_no_stage_imports_another_stage():
    """What two stages share (a model's objective, the generator) lives outside core/stages/."""
    for name, targets in core_imports().items():
        if name.startswith("core.stages."):
            others = {t for t in targets if t.startswith("core.stages") and t != "core.stages"}
            assert not others, f"{name} imports {others}"


def test_the_layout_check_sees_a_stage_importing_a_stage():
    graph = core_imports()
    assert "core.objectives.transformer" in graph["core.stages.transformer"]  # an edge it reads
    assert "core.generator" in graph["core.stages.export"]


def test_no_import_inside_a_function():
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [inner.module]
                        assert set(names) <= LAZY_ALLOWED, f"{path}:{inner.lineno} imports {names} inside {node.name}"


def test_test_modules_share_helpers_through_conftest_only():
    """A helper two test modules use lives in conftest.py, not in one of them."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.name} imports {name}" for name in names if name.startswith("test_")]
    assert offenders == []
