"""What each compression method is: where it acts, which model families it fits, its policy type.

Capabilities are declared here once; backends check them through :func:`require_support`, so an
unsupported method x model pair fails with one clear message everywhere (never a silent fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlmprune.policy import (
    AIMPolicy,
    ExplainPolicy,
    FastVPolicy,
    FasterVLMPolicy,
    GlobalCom2Policy,
    PolicyError,
    PoolPolicy,
    RandomPolicy,
    TransPrunePolicy,
)

ModelFamily = Literal["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
MODEL_FAMILIES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
ALL_FAMILIES = MODEL_FAMILIES

Stage = Literal["pre_llm", "llm_input", "in_llm"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    stage: Stage
    """pre_llm: decided from vision-side signals; llm_input: instruction-aware, pruned at the LLM
    input; in_llm: progressive inside the LLM (the reference backend, and vLLM on the in-LLM route;
    on the probe route a shallow probe at the LLM input for transprune and aim)."""
    models: tuple[str, ...]
    policy_type: type
    summary: str
    paper: str
    in_llm: bool = False
    """vLLM serves it between the served LLM's decoder layers on the in-LLM route (the default on
    every engine whose model runner the plugin hooks: :func:`served_in_llm`). ``explain`` too: its
    one LLM-input choice runs at layer 0 from layer 0's attention over the whole prompt (the
    reference's input), instead of the shallow probe over [image, instruction]."""
    at_input: bool = True
    """vLLM can serve it once at the LLM input (pre-LLM, or scored by the shallow probe): the route
    of engines the plugin does not hook and of ``VLMPRUNE_ROUTE=probe``. False for ``fastv``."""
    probe: bool = False
    """At the LLM input it is scored by the shallow probe of the served LM, with the request's
    instruction text (:mod:`vlmprune.vllm_plugin.probe`)."""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "fastervlm", "pre_llm", ALL_FAMILIES, FasterVLMPolicy,
            "[CLS] attention of the penultimate ViT layer (Qwen: mean attention received, 2x2-pooled)",
            "arXiv 2412.01818",
        ),
        MethodSpec(
            "globalcom2", "pre_llm", ("llava_next",), GlobalCom2Policy,
            "thumbnail [CLS] logits guide per-crop budgets; local + global scores inside crops (AnyRes)",
            "arXiv 2501.05179",
        ),
        MethodSpec(
            "aim", "in_llm", ALL_FAMILIES, AIMPolicy,
            "ToMe bipartite merging before the LLM, then PageRank importance pruning inside it",
            "arXiv 2412.03248", in_llm=True, probe=True,
        ),
        MethodSpec(
            "transprune", "in_llm", ALL_FAMILIES, TransPrunePolicy,
            "token transition variation + instruction-guided attention, pruned after layers 7/9/12",
            "arXiv 2507.20630", in_llm=True, probe=True,
        ),
        MethodSpec(
            "fastv", "in_llm", ALL_FAMILIES, FastVPolicy,
            "attention from the prompt's last token in layer K-1 ranks the image; pruned after layer K (K=2)",
            "arXiv 2403.06764", in_llm=True, at_input=False,
        ),
        MethodSpec(
            "explain", "llm_input", ALL_FAMILIES, ExplainPolicy,
            "a 1-D CNN maps layer-0 instruction->visual attention to learned relevance",
            "arXiv 2506.01097", in_llm=True, probe=True,
        ),
        MethodSpec("random", "pre_llm", ALL_FAMILIES, RandomPolicy, "seeded uniform random subset (baseline)", "-"),
        MethodSpec("pool", "pre_llm", ALL_FAMILIES, PoolPolicy, "spatial average pooling to the same count (baseline)", "-"),
    )
}


ROUTE_ENV = "VLMPRUNE_ROUTE"
"""Where vLLM serves the methods that have an in-LLM variant (:attr:`MethodSpec.in_llm`), read in
the engine's processes and in the gateway in front of it:

- ``in_llm`` (the default): between the served LLM's decoder layers, as the reference backend
  (:mod:`vlmprune.vllm_plugin.inllm`), with vLLM's chunked prefill and prefix caching left on;
- ``probe``: once at the LLM input, scored by the shallow probe (``fastv`` has none: refused).
  The plugin sets it on engines whose model runner it does not hook (CUDA's V2 runner), so the
  in-LLM route there is never attempted; ``vlmprune serve --route probe`` sets it on a CPU engine."""
ROUTES: tuple[str, ...] = ("in_llm", "probe")
LEGACY_IN_LLM_ENV = "VLMPRUNE_IN_LLM"
"""The former opt-in switch of the in-LLM route; the route is now the default, so ``1`` changes
nothing (``0`` selects the probe route, as ``VLMPRUNE_ROUTE=probe``)."""
IN_LLM_FAMILIES = frozenset({"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"})
"""Families whose served LM the in-LLM forward runs (``InLLMForward``)."""


def route() -> str:
    """This process's route (:data:`ROUTE_ENV`); raises ``ValueError`` on an unknown value."""
    import os

    value = os.environ.get(ROUTE_ENV)
    if value is None:
        return "probe" if os.environ.get(LEGACY_IN_LLM_ENV) == "0" else "in_llm"
    if value not in ROUTES:
        raise ValueError(f"{ROUTE_ENV} must be one of {', '.join(ROUTES)}, got {value!r}")
    return value


def served_in_llm(method: str, family: str) -> bool:
    """The one definition of "vLLM serves ``method`` on ``family`` between the decoder layers here"."""
    spec = METHODS.get(method)
    return (spec is not None and spec.in_llm and family in spec.models and family in IN_LLM_FAMILIES
            and route() == "in_llm")


def policy_in_llm(policy, family: str) -> bool:
    """Whether an (active) request policy is served by the in-LLM stages; ratio 0 / None never are."""
    return policy is not None and policy.ratio > 0.0 and served_in_llm(policy.method, family)


def vllm_serves(method: str, family: str) -> bool:
    """Whether the vLLM plugin serves ``method`` on ``family`` on this route."""
    spec = METHODS.get(method)
    return spec is not None and family in spec.models and (spec.at_input or served_in_llm(method, family))


def served_route(method: str, family: str) -> str:
    """How vLLM serves ``method`` on ``family`` here: ``in_llm``, ``probe``, ``pre_llm`` or
    ``refused`` (reported by the gateway's method list, headers and playground)."""
    spec = METHODS.get(method)
    if spec is None or not vllm_serves(method, family):
        return "refused"
    if served_in_llm(method, family):
        return "in_llm"
    return "probe" if spec.probe else "pre_llm"


def names(trait: str, family: str | None = None) -> frozenset[str]:
    """The methods whose :class:`MethodSpec` has ``trait`` true (``"probe"``, ``"in_llm"``, ...),
    among those that fit ``family`` when one is given."""
    return frozenset(name for name, spec in METHODS.items()
                     if getattr(spec, trait) and (family is None or family in spec.models))


def require_support(method: str, family: str) -> MethodSpec:
    """The method's spec, or a :class:`PolicyError` naming both the method and the model family."""
    spec = METHODS.get(method)
    if spec is None:
        raise PolicyError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    if family not in spec.models:
        raise PolicyError(
            f"method {method!r} does not apply to model family {family!r}; "
            f"it supports: {', '.join(spec.models)}"
        )
    return spec


def describe_methods() -> list[dict]:
    """JSON-ready description of every method (``vlmprune methods --json``)."""
    out = []
    for spec in METHODS.values():
        options = {
            name: {"default": f.default, "description": (f.description or "")}
            for name, f in spec.policy_type.model_fields.items()
            if name not in ("method",)
        }
        out.append(
            {
                "name": spec.name,
                "stage": spec.stage,
                "models": list(spec.models),
                "vllm_routes": {family: served_route(spec.name, family) for family in spec.models},
                "summary": spec.summary,
                "paper": spec.paper,
                "options": options,
            }
        )
    return out
