"""The shape of the code, read from its syntax trees: kitsnet is laid out by pipeline stage,
imports point only down the data flow, modules and functions stay small enough to read, and
the benchmarks stay a yardstick rather than a second library.

Why a test: each of these drifted before it was written down (an import cycle hidden by
function-level imports, the network importing the planner, prediction importing the training
loader, modules of 650 lines).  The layering below is the one kitsnet's subpackage docstrings
state; a new import that breaks it should be a decision, made here, not an accident.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

KITSNET = REPO / "kitsnet"
# What each part of kitsnet may import (besides itself): the data flow config -> plan ->
# preprocessed arrays -> models -> predictions -> scores -> table, over the shared layers
# core (I/O, device, resampling, settings) and stages (the configuration graph).
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "stages": {"core"},
    "data": {"core", "stages"},
    "plan": {"core", "stages", "data"},
    "preprocess": {"core", "stages", "data", "plan"},
    "model": {"core", "stages"},
    "train": {"core", "stages", "data", "plan", "preprocess", "model"},
    "predict": {"core", "stages", "data", "plan", "preprocess", "model"},
    "evaluate": {"core", "stages", "data"},
    "postprocess": {
        *("core", "stages", "data", "plan", "preprocess", "model", "predict", "evaluate"),
    },
    "report": {"core", "stages", "data", "plan", "train", "evaluate"},
}
TOP_LEVEL = {"__init__": {"core"}, "cli": set(ALLOWED)}  # the command sits on everything
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# 2,000 when issue 21 set it (from 3,440); issue 22 added the ensemble_storage benchmark
MAX_BENCHMARK_LINES = 2200


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of kitsnet (packages as their __init__)."""
    out = {}
    for path in sorted(KITSNET.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The kitsnet modules ``path`` imports (at any depth: function-level imports count), with
    the line; ``from kitsnet.x import y`` counts ``kitsnet.x.y`` when y is a module."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kitsnet":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; use kitsnet.<...>"
            if not node.module or node.module.split(".")[0] != "kitsnet":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in modules else node.module), node.lineno


def _part(module: str) -> str:
    """The layer a dotted module belongs to: its subpackage, or the top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(p, modules) if t != m} for m, p in modules.items()}


def test_kitsnet_has_a_subpackage_per_workflow_stage_and_rules_run_their_stage_code():
    """rules/X.smk runs code in kitsnet/X/: a reader of a rule finds its code by name."""
    packages = {p.parent.name for p in KITSNET.glob("*/__init__.py")}
    stages = sorted(p.stem for p in (REPO / "rules").glob("*.smk") if p.stem != "common")
    assert len(set(stages) & packages) >= 5, (stages, packages)
    assert set(stages) <= packages, f"rules without a kitsnet subpackage: {set(stages) - packages}"
    assert set(ALLOWED) | set(TOP_LEVEL) >= packages | {p.stem for p in KITSNET.glob("*.py")}, (
        "a new part of kitsnet needs its place in ALLOWED"
    )
    for stage in stages:
        smk = (REPO / "rules" / f"{stage}.smk").read_text()
        for script in re.findall(r'"\.\./workflow_scripts/(\w+)\.py"', smk):
            text = (REPO / "workflow_scripts" / f"{script}.py").read_text()
            assert f"kitsnet.{stage}" in text, (
                f"{script}.py (rules/{stage}.smk) runs no kitsnet.{stage} code"
            )


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in KITSNET.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Imports:" in doc or "import" in doc, f"{init}: docstring without its imports"


def test_imports_point_only_down_the_data_flow():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        src = _part(module)
        allowed = ALLOWED.get(src, TOP_LEVEL.get(src, set()))
        for target, line in _imports(path, modules):
            dst = _part(target)
            if dst != src and dst not in allowed and target != "kitsnet":
                upward.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not upward, "imports against the data flow:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    """Function-level imports count: a cycle hidden inside a function is still a cycle."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _python_files() -> Iterator[Path]:
    for folder in ("kitsnet", "workflow_scripts", "benchmarks"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_modules_and_functions_are_small_enough_to_read():
    too_long = []
    for path in _python_files():
        text = path.read_text()
        rel = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "over the size limits:\n" + "\n".join(too_long)


def test_benchmarks_stay_a_yardstick_not_a_second_library():
    """At most 2,000 lines, public kitsnet names only, and tests never lean on benchmarks
    (shared yardsticks live in tests/reference/, which benchmarks may import)."""
    files = sorted((REPO / "benchmarks").rglob("*.py"))
    total = sum(len(p.read_text().splitlines()) for p in files)
    assert total <= MAX_BENCHMARK_LINES, f"benchmarks/ has {total} lines"
    private = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kitsnet"):
                private += [
                    f"{path.relative_to(REPO)}:{node.lineno} {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not private, "benchmarks importing private kitsnet names:\n" + "\n".join(private)
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path.is_relative_to(REPO / "tests" / "bench"):
            continue  # the benchmarks' own tests
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "benchmarks" for n in names), (
                f"{path.relative_to(REPO)}:{node.lineno} imports benchmarks"
            )
