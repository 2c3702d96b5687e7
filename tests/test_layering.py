"""The package's layering, read from its import graph (grimp: every import statement of every module).

Layers, bottom up: ``vlmprune.core`` (pure tensor functions) -> ``vlmprune.reduction`` (what both
backends share) -> the two backends, ``vlmprune.backends`` (transformers) and ``vlmprune.vllm_plugin``,
which never import each other.

How imports count: every ``import`` statement in a module does, at module level or inside a function.
A lazy import inside a function defers loading (vLLM, transformers), not the dependency: a cycle
through one is still two modules that need each other. An import names one module
(``from vlmprune.testbed import scenes`` names ``vlmprune.testbed.scenes``); the parent packages whose
``__init__`` runs on the way are not counted as imported.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("vlmprune", "server")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports_between(graph: grimp.ImportGraph, importer: str, imported: str) -> list[str]:
    """``module:line: statement`` of every direct import from package ``importer`` into package ``imported``."""
    lines = []
    for module in sorted(m for m in graph.modules if _within(m, importer)):
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            if _within(target, imported):
                for detail in graph.get_import_details(importer=module, imported=target):
                    lines.append(f"{module}:{detail['line_number']}: {detail['line_contents']}")
    return lines


@pytest.mark.parametrize(
    "importer,imported",
    [
        ("vlmprune.vllm_plugin", "vlmprune.backends"),
        ("vlmprune.backends", "vlmprune.vllm_plugin"),
        ("vlmprune.reduction", "vlmprune.backends"),
        ("vlmprune.reduction", "vlmprune.vllm_plugin"),
        ("vlmprune.core", "vlmprune.reduction"),
        ("vlmprune.core", "vlmprune.backends"),
        ("vlmprune.core", "vlmprune.vllm_plugin"),
    ],
    ids=lambda name: name.removeprefix("vlmprune."),
)
def test_layer_never_imports(graph, importer, imported):
    """Neither backend imports the other; the shared layers import no backend (and the core not the
    reduction layer above it)."""
    assert _imports_between(graph, importer, imported) == []


def test_no_import_cycles(graph):
    """No two modules of ``vlmprune`` or ``server`` import each other, directly or through others."""
    cycles: dict[frozenset[str], tuple[str, ...]] = {}
    for module in sorted(graph.modules):
        for target in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=target, imported=module)
            if back is not None:
                cycle = (module, *back)
                cycles.setdefault(frozenset(cycle), cycle)
    assert [" -> ".join(c) for c in cycles.values()] == []
