"""The import rule of pipelines/__init__.py, checked on the source (every import, at any depth)."""

from __future__ import annotations

import ast
import graphlib
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("training", "evaluation", "scoring")


def layer(module: str) -> str:
    """ee_model, jobs, pipelines.<folder>, or pipelines (the shared modules)."""
    parts = module.split(".")
    if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in FOLDERS:
        return f"pipelines.{parts[1]}"
    return parts[0]


ALLOWED = {
    "ee_model": {"ee_model"},
    "pipelines": {"pipelines", "ee_model"},
    "pipelines.evaluation": {"pipelines.evaluation", "pipelines", "ee_model"},
    "pipelines.training": {"pipelines.training", "pipelines.evaluation", "pipelines", "ee_model"},
    "pipelines.scoring": {"pipelines.scoring", "pipelines.evaluation", "pipelines", "ee_model"},
    "jobs": {
        "jobs",
        "pipelines.training",
        "pipelines.scoring",
        "pipelines.evaluation",
        "pipelines",
        "ee_model",
    },
}
OURS = {"ee_model", "pipelines", "jobs"}


def imported(path: Path, names_may_be_modules: Callable[[str], bool]) -> set[str]:
    """Every module an import in `path` names, at any depth; for `from m import n`, also `m.n` when
    `names_may_be_modules(m)` (n may be a submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if names_may_be_modules(node.module):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imports_of(path: Path) -> set[str]:
    found = imported(path, lambda module: module == "pipelines")
    return {m for m in found if m.split(".")[0] in OURS}


def modules(root: Path = ROOT) -> list[tuple[str, Path]]:
    out = []
    for package in ("ee_model", "pipelines", "jobs"):
        for path in sorted((root / package).rglob("*.py")):
            out.append((".".join(path.relative_to(root).with_suffix("").parts), path))
    return out


@pytest.mark.parametrize("module, path", modules(), ids=[m for m, _ in modules()])
def test_imports_run_one_way(module, path):
    mine = layer(module)
    bad = sorted(m for m in imports_of(path) if layer(m) not in ALLOWED[mine])
    assert not bad, f"{module} ({mine}) imports {bad}; allowed: {sorted(ALLOWED[mine])}"


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    sneaky = tmp_path / "x.py"
    sneaky.write_text("def f():\n    from pipelines.training.steps import train_step\n")
    assert imports_of(sneaky) == {"pipelines.training.steps"}
    assert layer("pipelines.training.steps") not in ALLOWED["pipelines.scoring"]  # scoring may not do this


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the modules of ours it imports, at any depth}; packages' __init__ files left out (they
    re-export, so every `from ee_model import X` would meet them)."""
    names = {name for name, path in modules(root) if path.name != "__init__.py"}
    graph = {}
    for name, path in modules(root):
        if path.name == "__init__.py":
            continue
        found = imported(path, lambda module: True)
        graph[name] = {m for m in found if m in names and m != name}
    return graph


def test_no_import_cycles():
    try:
        order = list(graphlib.TopologicalSorter(module_graph()).static_order())
    except graphlib.CycleError as error:
        pytest.fail(f"import cycle: {' -> '.join(error.args[1])}")
    assert "ee_model.policies" in order and "ee_model.exit_risk" in order


def test_the_cycle_check_sees_a_deferred_import(tmp_path):
    (tmp_path / "ee_model").mkdir()
    (tmp_path / "ee_model" / "a.py").write_text("from ee_model.b import f\n")
    (tmp_path / "ee_model" / "b.py").write_text("def f():\n    from ee_model import a\n")
    assert module_graph(tmp_path) == {"ee_model.a": {"ee_model.b"}, "ee_model.b": {"ee_model.a"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(module_graph(tmp_path)).static_order())


MOST_LINES = 60  # a function longer than this holds several steps: name them


def test_no_library_or_pipeline_function_is_longer_than_a_screen():
    long = []
    for name, path in modules():
        if name.startswith("jobs."):  # a job's main is its CLI's declaration
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MOST_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long
