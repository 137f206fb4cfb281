"""The import graph keeps its layers: a static walk over every ``import`` in diffserve/.

Rules (issue 19, "a core below every stage"):

1. **The server never reaches training or profiling code.** No chain of imports, module-level or
   inside a function, leads from ``diffserve.server`` or ``diffserve.ray_engine`` to
   ``diffserve.cascade_builder`` or ``diffserve.profiler``.
2. **Core is below every stage.** The core (the top-level modules, ``diffserve.formats`` and
   ``diffserve.reference``) imports only core modules, never a stage (profiler, cascade builder,
   planner, server, evaluation, CLI, Ray engine) nor the model or dataset libraries.

A failure names the rule and prints the offending chain of imports.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffserve"
SERVING = ("diffserve.server", "diffserve.ray_engine")
TRAINING_AND_PROFILING = ("diffserve.cascade_builder", "diffserve.profiler")
CORE_PACKAGES = ("diffserve.formats", "diffserve.reference")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph() -> dict[str, set[str]]:
    """Module -> the diffserve modules it imports anywhere in its body (parents included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            found: list[str] = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in found:
                if not target.startswith("diffserve"):
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                    prefix = ".".join(parts[:i])
                    if prefix in modules and prefix != name:
                        targets.add(prefix)
        graph[name] = targets
    return graph


def _path_to(graph: dict[str, set[str]], start: str, forbidden) -> list[str] | None:
    """The shortest import chain from ``start`` to a module ``forbidden`` accepts, or None."""
    seen = {start: None}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        if forbidden(here) and here != start:
            chain = [here]
            while seen[chain[-1]] is not None:
                chain.append(seen[chain[-1]])
            return chain[::-1]
        for nxt in sorted(graph.get(here, ())):
            if nxt not in seen:
                seen[nxt] = here
                queue.append(nxt)
    return None


def _is_core(name: str) -> bool:
    """The package itself, its top-level modules (not subpackages) and the core subpackages."""
    if name == "diffserve" or _under(name, CORE_PACKAGES):
        return True
    return name.count(".") == 1 and (PACKAGE / f"{name.split('.')[1]}.py").is_file()


GRAPH = import_graph()


def test_the_walk_sees_the_imports_it_must_judge():
    """The walk itself: lazy imports inside functions count, and relative imports resolve."""
    assert "diffserve.reference" in GRAPH["diffserve.artifacts"]  # imported inside load_profile
    assert "diffserve.reference.scenario" in GRAPH["diffserve.reference"]
    assert "diffserve.formats.runtime_csv" in GRAPH["diffserve.profiler"]
    assert "diffserve.cascade_builder.curves" in GRAPH["diffserve.cascade_builder.build"]
    assert _path_to({"a": {"b"}, "b": {"c"}}, "a", lambda m: m == "c") == ["a", "b", "c"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _under(m, SERVING)))
def test_rule_1_the_server_never_reaches_training_or_profiling_code(module):
    chain = _path_to(GRAPH, module, lambda m: _under(m, TRAINING_AND_PROFILING))
    assert chain is None, "rule 1 (the server never imports cascade_builder or profiler, even indirectly): " + " -> ".join(chain)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _is_core(m)))
def test_rule_2_core_is_below_every_stage(module):
    chain = _path_to(GRAPH, module, lambda m: not _is_core(m))
    assert chain is None, "rule 2 (core imports only core: no stage, model or dataset module): " + " -> ".join(chain)


def test_core_is_what_the_rules_say():
    core = {m for m in GRAPH if _is_core(m)}
    assert {"diffserve.artifacts", "diffserve.schemas", "diffserve.reference.scenario", "diffserve.formats.pair"} <= core
    assert not core & {"diffserve.server", "diffserve.planner", "diffserve.models", "diffserve.datasets"}


def test_importing_the_server_loads_no_training_or_profiling_module():
    """The same rule at run time, in a fresh interpreter (catches imports the walk cannot see)."""
    servers = sorted(m for m in GRAPH if _under(m, ("diffserve.server",)))
    code = (
        "import importlib, sys\n"
        f"for m in {servers!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({TRAINING_AND_PROFILING!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", "rule 1 at run time: " + out.stdout
