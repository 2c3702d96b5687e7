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
    input; in_llm: progressive inside the LLM (transformers backend; a shallow probe in vLLM for
    transprune and aim; fastv has no probe variant)."""
    models: tuple[str, ...]
    policy_type: type
    summary: str
    paper: str
    vllm: bool = True
    """The vLLM plugin serves it. False (``fastv`` until the plugin prunes between the served LLM's
    decoder layers, issue 11): reference backend only; the plugin refuses it by name
    (:func:`vlmprune.vllm_plugin.common.check_method`) and the gateway does not offer it."""


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
            "arXiv 2412.03248",
        ),
        MethodSpec(
            "transprune", "in_llm", ALL_FAMILIES, TransPrunePolicy,
            "token transition variation + instruction-guided attention, pruned after layers 7/9/12",
            "arXiv 2507.20630",
        ),
        MethodSpec(
            "fastv", "in_llm", ALL_FAMILIES, FastVPolicy,
            "attention from the prompt's last token in layer K-1 ranks the image; pruned after layer K (K=2)",
            "arXiv 2403.06764", vllm=False,
        ),
        MethodSpec(
            "explain", "llm_input", ALL_FAMILIES, ExplainPolicy,
            "a 1-D CNN maps layer-0 instruction->visual attention to learned relevance",
            "arXiv 2506.01097",
        ),
        MethodSpec("random", "pre_llm", ALL_FAMILIES, RandomPolicy, "seeded uniform random subset (baseline)", "-"),
        MethodSpec("pool", "pre_llm", ALL_FAMILIES, PoolPolicy, "spatial average pooling to the same count (baseline)", "-"),
    )
}


IN_LLM_ENV = "VLMPRUNE_IN_LLM"
"""``1`` on a vLLM engine (and the gateway in front of it): the progressive methods of
:data:`IN_LLM_METHODS` run between the served LLM's decoder layers (``vlmprune.vllm_plugin.inllm``)
on the families of :data:`IN_LLM_FAMILIES`; otherwise (and on other families) the shallow probe
prunes them at the LLM input. The launcher sets it with the engine flags the mode requires."""
IN_LLM_METHODS = frozenset({"transprune", "aim", "fastv"})
IN_LLM_FAMILIES = frozenset({"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"})


def in_llm_mode() -> bool:
    """Whether this process serves (or fronts) an engine in in-LLM mode (``VLMPRUNE_IN_LLM=1``)."""
    import os

    return os.environ.get(IN_LLM_ENV, "0") == "1"


def served_in_llm(method: str, family: str) -> bool:
    """Whether vLLM runs ``method`` on ``family`` inside the LLM here (stage by stage)."""
    return in_llm_mode() and method in IN_LLM_METHODS and family in IN_LLM_FAMILIES


def vllm_serves(method: str, family: str) -> bool:
    """Whether the vLLM plugin serves ``method`` on ``family`` here (``fastv``: in-LLM mode only)."""
    spec = METHODS.get(method)
    return spec is not None and family in spec.models and (spec.vllm or served_in_llm(method, family))


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
                "summary": spec.summary,
                "paper": spec.paper,
                "options": options,
            }
        )
    return out
