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


def _sources(*roots: str):
    """(dotted module name, parsed tree) of every module under ``roots`` (folders of the repository)."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            name = ".".join(path.relative_to(repo).with_suffix("").parts).removesuffix(".__init__")
            yield name, ast.parse(path.read_text())


def test_one_definition_of_the_in_llm_route_and_of_the_method_traits():
    """Whether vLLM serves a method between the decoder layers is decided in one place
    (``vlmprune.methods``: the route's environment variable is read there alone, and
    ``served_in_llm`` / ``policy_in_llm`` are the only predicates); which methods are probe-scored,
    in-LLM or servable at the LLM input are fields of ``MethodSpec``, never a hand-kept set of names
    at module level elsewhere (``vlmprune.methods.names`` derives them; tables of per-method data,
    e.g. the papers' figures, are not sets)."""
    import ast
    import re

    from vlmprune.methods import METHODS

    predicates, route_env, name_sets = [], set(), []
    for module, tree in _sources("vlmprune", "server"):
        for node in ast.walk(tree):
            is_predicate = isinstance(node, ast.FunctionDef) and ast.unparse(node.returns or ast.Constant(None)) == "bool"
            if is_predicate and re.search(r"in_llm|^enabled$|^hooked$", node.name):
                predicates.append(f"{module}.{node.name}")
            if isinstance(node, ast.Constant) and node.value in ("VLMPRUNE_ROUTE", "VLMPRUNE_IN_LLM"):
                route_env.add(module)
    for module, tree in _sources("vlmprune", "server", "bench"):
        if module == "vlmprune.methods":
            continue
        for node in tree.body:
            value = getattr(node, "value", None)
            is_set = isinstance(value, ast.Set) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id in ("set", "frozenset"))
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and is_set:
                names = {c.value for c in ast.walk(value) if isinstance(c, ast.Constant) and c.value in METHODS}
                if len(names) >= 2:
                    name_sets.append(f"{module}:{node.lineno}: {sorted(names)}")
    assert sorted(predicates) == ["vlmprune.methods.policy_in_llm", "vlmprune.methods.served_in_llm"]
    assert route_env == {"vlmprune.methods"}
    assert name_sets == []


def test_one_rule_for_where_the_instruction_starts():
    """The instruction starts after the last image (past Qwen's ``<|vision_end|>``) by one function,
    used by the reference backend, the processor's prompt check and the in-LLM stages alike."""
    from vlmprune.reduction.stages import instruction_start

    users = sorted(module for module, tree in _sources("vlmprune", "server")
                   if "instruction_start(" in ast_text(tree) and module != "vlmprune.reduction.stages")
    assert users == ["vlmprune.backends.hf.llava", "vlmprune.backends.hf.qwen2_vl", "vlmprune.vllm_plugin.inllm_plan",
                     "vlmprune.vllm_plugin.request_policy"]
    assert instruction_start([5, 6, 7, 77, 9], 3, vision_end=77) == 4
    assert instruction_start([5, 6, 7, 8, 9], 3, vision_end=77) == 3
    assert instruction_start([5, 6, 7], 3, vision_end=77) == 3
    assert instruction_start([5, 6, 7], 0) == 0


def ast_text(tree) -> str:
    import ast

    return ast.unparse(tree)


def test_one_wire_module_for_the_policy():
    """The policy's key and its mapping and byte forms are defined in ``vlmprune.wire`` alone: no other
    module assigns the key names, dumps a policy to JSON bytes or parses one from them."""
    import ast

    offenders = []
    for module, tree in _sources("vlmprune", "server"):
        if module == "vlmprune.wire":
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for t in targets:
                if isinstance(t, ast.Name) and t.id in ("POLICY_KEY", "INSTRUCTION_KEY"):
                    offenders.append(f"{module}:{node.lineno}: defines {t.id}")
        text = ast_text(tree)
        for pattern in ("model_dump(), sort_keys=True", "parse_policy(json.loads("):
            if pattern in text:
                offenders.append(f"{module}: {pattern}")
    assert offenders == []


def test_one_plan_and_one_anyres_geometry():
    """Visual-token counts come from ``vlmprune.reduction.plan`` (the former count helpers are gone),
    and LLaVA-NeXT's packed-row geometry from ``vlmprune.reduction.anyres`` in both backends."""
    gone = ("input_keep", "served_input_count", "served_in_llm_stages", "prunable_keep", "image_count",
            "in_llm_stages")
    defined = sorted(f"{module}.{node.name}" for module, tree in _sources("vlmprune", "server")
                     for node in ast_walk(tree) if getattr(node, "name", None) in gone
                     and module != "server.playground.serving")  # the playground's reads traces
    assert defined == []
    users = sorted(module for module, tree in _sources("vlmprune")
                   if "packed_image_tokens(" in ast_text(tree) and module != "vlmprune.reduction.anyres")
    assert users == ["vlmprune.backends.hf.llava_next", "vlmprune.vllm_plugin.llava_next"]


def ast_walk(tree):
    import ast

    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
