"""Every change vlmprune makes to vLLM's own classes, in one place.

The plugin adds model subclasses through vLLM's registry; everything else it needs from vLLM's
front end, scheduler and model runner is a wrapped method, listed here with the process it acts
in. The logic each wrapper runs lives with its concern (:mod:`.inllm`, :mod:`.encoder_budget`,
:mod:`.fallback`, :mod:`.processor`); this module only says *where* it hooks in. Every patch is
idempotent (``register()`` runs in every vLLM process, sometimes twice) and leaves requests and
engines without a vlmprune policy on vLLM's own path.

| class.method | process | why |
|---|---|---|
| ``BaseRenderer.__init__`` | front end | the processor learns the step budget (an in-LLM span too long for a step: a 400) |
| ``Scheduler.add_request`` | engine core | in-LLM requests never read prefix-cache hits and are marked with their first image row; pruned images get their encoder surcharge |
| ``Scheduler._try_schedule_encoder_inputs`` | engine core | an in-LLM span is prefilled in one step; a pruned image costs its unpruned encoder work |
| ``GPUModelRunner._batch_mm_inputs_from_scheduler`` / ``_execute_mm_encoder`` | worker (V1 runner) | encoded items learn their encoder-cache hash; requests served with a fallback get a report |
| ``CPUModelRunner.load_model`` | worker (CPU) | M-RoPE positions recomputed for vlmprune's Qwen models |
| ``CPUModelRunner._model_forward`` / ``_update_states`` | worker (CPU) | the in-LLM forward knows which batch rows are which request's |
| ``MultiModalConfig.is_multimodal_pruning_enabled`` | worker | true for the engine config a vlmprune Qwen model marked (:func:`patch_multimodal_config`) |
"""

from __future__ import annotations

import functools
from typing import Any, Callable

MARK = "_vlmprune_patches"
"""Attribute of a wrapper: the keys of the patches applied along its chain of wrapped originals."""


def patch(owner: type, name: str, key: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.<name>`` by ``make(original)`` unless patch ``key`` is already in place."""
    original = getattr(owner, name)
    applied = getattr(original, MARK, frozenset())
    if key in applied:
        return
    wrapper = functools.update_wrapper(make(original), original)
    setattr(wrapper, MARK, applied | {key})
    setattr(owner, name, wrapper)


def install(cpu: bool) -> None:
    """Every patch this process needs (``cpu``: vLLM's CPU platform, whose V1 runner the in-LLM
    route hooks)."""
    patch_renderer()
    patch_scheduler()
    patch_runner(cpu)


def patch_renderer() -> None:
    from vllm.renderers.base import BaseRenderer

    from vlmprune.vllm_plugin.processor import PolicyProcessorMixin

    def make(original):
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            original(self, config, *args, **kwargs)
            processor = getattr(self, "mm_processor", None)
            if isinstance(processor, PolicyProcessorMixin):
                processor.vlmprune_step_budget = int(config.scheduler_config.max_num_batched_tokens)
        return __init__

    patch(BaseRenderer, "__init__", "step_budget", make)


def patch_scheduler() -> None:
    """``AsyncScheduler`` inherits both wrappers."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from vlmprune.vllm_plugin import encoder_budget, inllm_plan

    def make_add(original):
        def add_request(self, request: Any) -> None:
            inllm_plan.mark_request(request)
            encoder_budget.mark_request(request)
            return original(self, request)
        return add_request

    def make_schedule(original):
        def _try_schedule_encoder_inputs(self, request: Any, num_computed_tokens: int, num_new_tokens: int,
                                         encoder_compute_budget: int, *args: Any, **kwargs: Any):
            span_start = getattr(request, "vlmprune_span_start", None)
            surcharges = getattr(request, "vlmprune_encoder_surcharges", None)
            if span_start is None and not surcharges:
                return original(self, request, num_computed_tokens, num_new_tokens, encoder_compute_budget,
                                *args, **kwargs)
            prompt_len = request.num_prompt_tokens
            if span_start is not None:  # never end the step inside the span (inllm_plan.in_llm_step)
                num_new_tokens = inllm_plan.in_llm_step(span_start, prompt_len, num_computed_tokens, num_new_tokens)
            with encoder_budget.charged(self.encoder_cache_manager, request, surcharges):
                inputs, new_tokens, budget, *rest = original(self, request, num_computed_tokens, num_new_tokens,
                                                             encoder_compute_budget, *args, **kwargs)
            if span_start is not None:
                held = inllm_plan.in_llm_step(span_start, prompt_len, num_computed_tokens, new_tokens)
                if held != new_tokens:
                    # vLLM cut the step before an image it could not encode in this step (the encoder
                    # budget spent by other requests): all of the span's images wait for a later step
                    # together. Nothing is scheduled for them (``can_allocate`` only reserved, and the
                    # step allocates what is returned).
                    return [], held, encoder_compute_budget, *([] for _ in rest)
            budget -= encoder_budget.admitted_surcharge(surcharges, inputs)
            return (inputs, new_tokens, budget, *rest)
        return _try_schedule_encoder_inputs

    patch(Scheduler, "add_request", "mark_request", make_add)
    patch(Scheduler, "_try_schedule_encoder_inputs", "encoder_inputs", make_schedule)


def patch_runner(cpu: bool) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vlmprune.vllm_plugin import fallback

    def make_batch(original):
        def _batch_mm_inputs_from_scheduler(self, scheduler_output: Any):
            hashes, *rest = original(self, scheduler_output)
            fallback.start_encoding(hashes)
            return (hashes, *rest)
        return _batch_mm_inputs_from_scheduler

    def make_encode(original):
        def _execute_mm_encoder(self, scheduler_output: Any):
            try:
                return original(self, scheduler_output)
            finally:
                fallback.end_encoding(self, scheduler_output)
        return _execute_mm_encoder

    patch(GPUModelRunner, "_batch_mm_inputs_from_scheduler", "encoding_order", make_batch)
    patch(GPUModelRunner, "_execute_mm_encoder", "fallback_reports", make_encode)
    if cpu:
        patch_cpu_runner()


def patch_cpu_runner() -> None:
    from vllm.model_executor.models.interfaces import supports_multimodal_pruning
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    from vlmprune.vllm_plugin import inllm_plan

    def make_load(original):
        def load_model(self, *args: Any, **kwargs: Any) -> None:
            # vLLM 0.32's CPU runner overrides the GPU runner's load_model and never sets
            # ``is_multimodal_pruning_enabled`` (position channels appended by ``embed_multimodal``
            # would never be stripped): set it as the GPU runner does, only for a model that
            # declares ``vlmprune_mrope_pruning``.
            original(self, *args, **kwargs)
            model = self.get_model()
            if getattr(model, "vlmprune_mrope_pruning", False):
                mm_config = self.model_config.multimodal_config
                self.is_multimodal_pruning_enabled = bool(
                    supports_multimodal_pruning(model) and mm_config is not None
                    and mm_config.is_multimodal_pruning_enabled()
                )
        return load_model

    def make_forward(original):
        def _model_forward(self, *args: Any, **kwargs: Any):
            inllm_plan.begin_batch(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                inllm_plan.end_batch()
        return _model_forward

    def make_update(original):
        def _update_states(self, scheduler_output: Any):
            inllm_plan.forget_requests(scheduler_output.finished_req_ids)
            return original(self, scheduler_output)
        return _update_states

    patch(CPUModelRunner, "load_model", "mrope_positions", make_load)
    patch(CPUModelRunner, "_model_forward", "batch_rows", make_forward)
    patch(CPUModelRunner, "_update_states", "finished_requests", make_update)


def patch_multimodal_config(mark: str) -> None:
    """``MultiModalConfig.is_multimodal_pruning_enabled`` also true for an instance carrying
    ``mark`` (set by a vlmprune Qwen model on its own engine's config); every other engine keeps
    vLLM's rule (``video_pruning_rate > 0``)."""
    from vllm.config.multimodal import MultiModalConfig

    def make(original):
        def is_multimodal_pruning_enabled(self) -> bool:
            return bool(getattr(self, mark, False)) or original(self)
        return is_multimodal_pruning_enabled

    patch(MultiModalConfig, "is_multimodal_pruning_enabled", "mrope_config", make)
