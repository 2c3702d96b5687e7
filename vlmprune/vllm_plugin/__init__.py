"""vLLM general plugin: per-request visual-token pruning inside stock vLLM 0.32 / 0.33.

Versions: 0.32.x is engine-tested (the CPU build, every test here); 0.33.x is source-checked (the
modules the plugin uses are unchanged from 0.32, ``../shared/design/INLLM_VLLM.md``); any other
version refuses to start (:func:`vlmprune.vllm_plugin.engine_checks.check_engine`).

Entry point (``pyproject.toml``)::

    [project.entry-points."vllm.general_plugins"]
    vlmprune = "vlmprune.vllm_plugin:register"

vLLM calls :func:`register` in every process it starts (front end, engine core, workers, the
registry's inspection subprocess). It re-registers the stock architectures with lazy
``"module:Class"`` strings, so nothing heavy is imported here and importing this package never
raises. Without a policy in a request (or at ratio 0) the registered subclasses behave exactly
like the stock models. Exclude the plugin with vLLM's allow-list, e.g. ``VLLM_PLUGINS=none``.

Usage (the policy is :mod:`vlmprune.policy`'s: ``method``, ``ratio`` and the method's options)::

    # offline
    llm.generate({"prompt": "USER: <image>\\nWhat is this? ASSISTANT:",
                  "multi_modal_data": {"image": image},
                  "mm_processor_kwargs": {"vlmprune": {"method": "fastervlm", "ratio": 0.9}}})
    # OpenAI-compatible server: extra_body={"mm_processor_kwargs": {"vlmprune": {...}}}
    # engine-wide default:  vllm serve MODEL --mm-processor-kwargs '{"vlmprune": {"method": "pool", "ratio": 0.5}}'

Requests merge over the default recursively (``{"vlmprune": {"ratio": 0.9}}`` keeps the default's
method; ``{"vlmprune": null}`` disables pruning); see :mod:`vlmprune.vllm_plugin.request_policy`.
Routes (:data:`vlmprune.methods.ROUTE_ENV`): on every engine whose model runner the plugin hooks
(vLLM's V1 runner: every CPU engine), ``transprune``, ``aim`` and ``fastv`` run **between the served
LLM's decoder layers** by default (the in-LLM route, :mod:`vlmprune.vllm_plugin.inllm`), exactly as the
reference backend's progressive loop, on LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL, with vLLM's
chunked prefill and prefix caching left on (an in-LLM request's rows from its first image to the
end of its prompt are prefilled in one step; it never reads a prefix-cache hit). Elsewhere (CUDA's
V2 runner), or with ``VLMPRUNE_ROUTE=probe``, ``transprune`` and ``aim`` are pruned once at the LLM
input, scored by a shallow probe of the served LM (:mod:`vlmprune.vllm_plugin.probe`), which needs the
request's instruction in the policy (``{"vlmprune": {..., "instruction": "..."}}``), and ``fastv`` is
refused. Always at the LLM input: ``fastervlm``, ``globalcom2`` (LLaVA-NeXT), ``random``, ``pool`` and
the probe-scored ``explain``.

Counts: each image's plan (:func:`vlmprune.reduction.plan.plan_image`). The pre-LLM methods keep
``kept_count(n, ratio)`` tokens per image at the LLM input; so do the probe-route ``transprune`` /
``aim``, whose ``ratio`` is the layer-averaged removed fraction (the count with the same LLM FLOPs as
the reference's in-LLM schedule). On the in-LLM route the placeholders hold what enters the first
layer (every token for TransPrune and FastV, the merge count for AIM) and the stages prune inside.
The explain method's CNN weights are ``checkpoint`` or ``vlmprune_explain_cnn.pt`` beside the model.

Kept-token traces (the gateway's playground): with ``VLMPRUNE_TRACE_DIR`` set on the engine, a
request whose policy holds ``"trace": "<id>"`` gets its kept token indices written there, one file
per image, from ``embed_multimodal`` (:mod:`vlmprune.trace`, :mod:`vlmprune.vllm_plugin.tracing`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Architecture name -> lazy "module:Class" of the vlmprune subclass.
MODELS: dict[str, str] = {
    "LlavaForConditionalGeneration": "vlmprune.vllm_plugin.llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "vlmprune.vllm_plugin.llava_next:PrunedLlavaNext",
    "Qwen2VLForConditionalGeneration": "vlmprune.vllm_plugin.qwen2_vl:PrunedQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vlmprune.vllm_plugin.qwen2_vl:PrunedQwen2_5_VL",
}

_registered = False


def register() -> None:
    """Register the pruning model subclasses (their processors come with them); idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    _registered = True
    logger.info("vlmprune: pruning enabled for %s", ", ".join(MODELS))
    import os

    from vllm.platforms import current_platform

    from vlmprune.methods import ROUTE_ENV, route

    if not current_platform.is_cpu() and ROUTE_ENV not in os.environ:
        # Only the CPU V1 model runner is hooked: elsewhere the in-LLM methods take the probe route.
        os.environ[ROUTE_ENV] = "probe"
    route()  # an unknown VLMPRUNE_ROUTE fails here, in every process, before anything is served
    from vlmprune.vllm_plugin import patches

    patches.install(cpu=current_platform.is_cpu())  # every wrapped vLLM method: see patches.py
