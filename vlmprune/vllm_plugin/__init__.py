"""vLLM general plugin: per-request visual-token pruning inside stock vLLM 0.32 / 0.33.

Versions: 0.32.x is engine-tested (the CPU build, every test here); 0.33.x is source-checked (the
modules the plugin uses are unchanged from 0.32, ``../shared/design/INLLM_VLLM.md``); any other
version refuses to start (:func:`vlmprune.vllm_plugin.common.check_engine`).

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
method; ``{"vlmprune": null}`` disables pruning); see :mod:`vlmprune.vllm_plugin.common`.
Available in vLLM: ``fastervlm``, ``globalcom2`` (LLaVA-NeXT), ``random``, ``pool``, and the
instruction-aware ``transprune``, ``aim`` (ToMe merge, then PageRank pruning) and ``explain``, which
score with a shallow probe of the served LM (:mod:`vlmprune.vllm_plugin.probe`) and need the request's
instruction in the policy: ``{"vlmprune": {"method": "transprune", "ratio": 0.75, "instruction": "..."}}``.

In-LLM mode (``VLMPRUNE_IN_LLM=1`` on the engine, ``vlmprune serve --in-llm``): on LLaVA-1.5,
``transprune``, ``aim`` and ``fastv`` run between the served LLM's decoder layers instead, exactly as
the reference backend's progressive loop, with the prompt's own instruction tokens (no
``instruction`` needed); the engine must run eager without chunked prefill, or it refuses to start
(prefix caching stays on: those requests never read a hit) (:mod:`vlmprune.vllm_plugin.inllm`). The counts below are then the LLM-input ones
of :func:`vlmprune.reduction.stages.served_input_count`.

Counts: every method keeps ``kept_count(n, ratio)`` tokens per image at the LLM input. For the
progressive methods (``transprune``, ``aim``) ``ratio`` is the layer-averaged removed fraction, so
pruning everything at the LLM input to ``kept_count(n, ratio)`` gives the same LLM FLOPs as the
in-LLM schedule of the reference backend (which keeps more at the input and prunes further inside).
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
    # For the Qwen models (M-RoPE): the CPU runner must recompute positions; see common.py.
    from vlmprune.vllm_plugin.common import install_cpu_runner_hook

    install_cpu_runner_hook()
    # In-LLM TransPrune / AIM (VLMPRUNE_IN_LLM=1): batch rows -> request ids; see inllm.py.
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vlmprune.vllm_plugin.inllm import install_runner_hooks

        install_runner_hooks()
    from vlmprune.vllm_plugin.inllm import install_scheduler_hook

    install_scheduler_hook()  # engine-core process: in-LLM requests never read prefix-cache hits
