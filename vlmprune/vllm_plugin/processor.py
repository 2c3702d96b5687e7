"""The processor side every vlmprune model shares: the policy kept away from the Hugging Face
processor, and the mixin that validates a request, plans each image and attaches the fields.

Counts in vLLM: each image's :class:`vlmprune.reduction.plan.ImagePlan` on the route this engine
serves the method on. Pre-LLM and probe routes keep ``kept_count(n, ratio)`` prunable tokens per
image (per view on LLaVA-NeXT), the progressive methods included: pruned once, at the LLM input, to
the count whose LLM FLOPs equal the layer-averaged ``ratio`` of their schedule. On the in-LLM route
the prompt holds what enters the first decoder layer (TransPrune and FastV every token, AIM its
merge count) and the stages remove the rest. The gateway reads the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm.multimodal.processing import InputProcessingContext

from vlmprune.policy import PolicyError
from vlmprune.reduction.plan import plan_image
from vlmprune.trace import TRACE_DIR_ENV, TRACE_KEY, trace_dir
from vlmprune.vllm_plugin.fields import FIELD_COUNT, encode_fields, encoded_counts, fields_config
from vlmprune.vllm_plugin.request_policy import (
    PLUGIN_METHODS,
    check_in_llm_prompt,
    check_method,
    check_probe,
    instruction_ids,
    merged_request,
    without_policy,
)
from vlmprune.wire import POLICY_KEY, RequestPolicy


@dataclass(frozen=True)
class PolicyFreeContext(InputProcessingContext):
    """vLLM's ``InputProcessingContext`` whose merged processor kwargs never hold ``vlmprune``."""

    def get_merged_mm_kwargs(self, kwargs, **extra):  # type: ignore[override]
        merged = super().get_merged_mm_kwargs(without_policy(kwargs), **extra)
        merged.pop(POLICY_KEY, None)
        return merged


def policy_free_context(ctx: InputProcessingContext) -> PolicyFreeContext:
    """A copy of vLLM's processing context whose kwarg merges drop the plugin's key.

    vLLM merges the engine default into the kwargs it hands the Hugging Face processor
    (``get_hf_processor``, ``call_hf_processor``); through this context the policy never gets
    there. (One path remains outside the context: vLLM's ``cached_processor_from_config`` merges
    the engine default once more into ``ProcessorMixin.from_pretrained``'s kwargs, which
    transformers 5.19 ignores for unknown names - verified for the LLaVA processors.)
    """
    if isinstance(ctx, PolicyFreeContext):
        return ctx
    if type(ctx) is not InputProcessingContext:
        raise TypeError(f"unexpected processing context type {type(ctx).__name__}")
    return PolicyFreeContext(ctx.model_config, ctx.tokenizer)


class PolicyProcessorMixin:
    """Mixin for a vLLM multimodal processor (put it first in the bases).

    Subclasses set ``vlmprune_family`` and implement :meth:`_vlmprune_token_parts`; their
    ``_get_prompt_updates`` read each image's count with :func:`item_count`. Requires the info's
    context to be :func:`policy_free_context` (see ``vlmprune.vllm_plugin.llava``).
    """

    vlmprune_family: str = ""
    vlmprune_methods: frozenset[str] = PLUGIN_METHODS
    vlmprune_step_budget: int | None = None
    """The engine's ``max_num_batched_tokens`` (:func:`vlmprune.vllm_plugin.patches.patch_renderer`): the longest span an
    in-LLM request may prefill in one step; None where the processor was built without it."""

    # Hooks -------------------------------------------------------------------------------------
    def _vlmprune_token_parts(self, hf_inputs: Any) -> list[tuple[int | tuple[int, ...], int]]:
        """Per image of the HF processor's output: (prunable tokens, or their count per view for a
        multi-view image, always-kept tokens)."""
        raise NotImplementedError

    def _vlmprune_unsupported(self) -> str | None:
        """Why this model's configuration cannot be pruned (None if it can)."""
        return None

    # Shared behaviour --------------------------------------------------------------------------
    def _vlmprune_model_name(self) -> str:
        return str(self.info.ctx.model_config.model)  # type: ignore[attr-defined]

    def _vlmprune_num_layers(self) -> int:
        cfg = self.info.get_hf_config()  # type: ignore[attr-defined]
        text = getattr(cfg, "text_config", cfg)
        return int(text.num_hidden_layers)

    def vlmprune_request(self, request_kwargs: Mapping[str, object]) -> RequestPolicy:
        """Validate the merged policy of a request for this model (raises ``PolicyError``)."""
        mm_config = self.info.ctx.get_mm_config()  # type: ignore[attr-defined]
        request = merged_request(mm_config, request_kwargs)
        check_method(request, self.vlmprune_family, self.vlmprune_methods, self._vlmprune_model_name())
        if request.trace is not None and trace_dir() is None:
            raise PolicyError(f"field {TRACE_KEY!r}: kept-token traces are off on this engine "
                              f"(start vLLM with {TRACE_DIR_ENV}=<folder>)")
        if request.policy is not None:
            reason = self._vlmprune_unsupported()
            if reason is not None:
                raise PolicyError(f"vlmprune cannot prune {self._vlmprune_model_name()}: {reason}")
            check_probe(
                request,
                self.vlmprune_family,
                self._vlmprune_num_layers(),
                self._vlmprune_model_name(),
                self.info.get_tokenizer(),  # type: ignore[attr-defined]
            )
        return request

    def apply(self, inputs, timing_ctx):  # noqa: D401 - vLLM's signature
        """vLLM's processing, then the in-LLM stages' check of the whole prompt (placeholders
        placed), for every request, the processor cache's hits included."""
        out = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        policy = merged_request(self.info.ctx.get_mm_config(), inputs.hf_processor_mm_kwargs).policy  # type: ignore[attr-defined]
        vision_end = getattr(self.info.get_hf_config(), "vision_end_token_id", None)  # type: ignore[attr-defined]
        check_in_llm_prompt(policy, self.vlmprune_family, out["prompt_token_ids"], out["mm_placeholders"], vision_end,
                            getattr(self, "vlmprune_step_budget", None), encoded_counts(out["mm_kwargs"]))
        return out

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        """Profiling inputs without pruning, whatever the engine default.

        vLLM sizes the encoder cache (and profiles memory) from the placeholders of these dummy
        inputs; under an active default policy they would be pruned and every unpruned request
        would then be rejected as too large for the cache. ``{"vlmprune": None}`` overrides the
        default, so profiling sees the stock worst case.
        """
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)  # type: ignore[misc]
        inputs.hf_processor_mm_kwargs = {**inputs.hf_processor_mm_kwargs, POLICY_KEY: None}
        return inputs

    def _call_hf_processor(self, hf_data, hf_kwargs):  # noqa: D401 - vLLM's signature
        request = self.vlmprune_request(hf_kwargs)
        out = super()._call_hf_processor(hf_data, without_policy(hf_kwargs))  # type: ignore[misc]
        parts = self._vlmprune_token_parts(out)
        if not parts:
            return out
        layers = self._vlmprune_num_layers()
        plans = [plan_image(request.policy, self.vlmprune_family, n, layers, fixed=fixed) for n, fixed in parts]
        counts = [plan.prompt_tokens for plan in plans]
        ids = instruction_ids(self.info.get_tokenizer(), request)  # type: ignore[attr-defined]
        stock = [plan.prunable + plan.fixed for plan in plans]  # what the encoder computes
        out.update(encode_fields(request, counts, ids, encoded=stock))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if FIELD_COUNT in hf_inputs:
            config.update(fields_config())
        return config
