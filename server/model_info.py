"""What the gateway knows about the served model: family, visual-token geometry, FLOPs shape.

Read from the model directory (``config.json`` and the processor config) once; the counts come
from :mod:`vlmprune.geometry` (the plugin's own numbers) and the FLOPs from :mod:`vlmprune.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprune.geometry import ImageTokenCounts, ModelVisionSpec
from vlmprune.methods import policy_in_llm


@dataclass(frozen=True)
class RequestCost:
    visual_in: int
    """Prunable visual tokens of all images (newlines excluded)."""
    visual_kept: int
    baseline_flops: float
    actual_flops: float


class ServedModel:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoConfig  # the defaults config.json omits come from the class

        from vlmprune.flops import from_hf_config

        self.model_dir = str(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.config = config
        self.spec = ModelVisionSpec.from_pretrained(model_dir, config.to_dict())
        self.family = self.spec.family
        self.vision, self.lm = from_hf_config(config)

    def image_tokens(self, width: int, height: int) -> ImageTokenCounts:
        return self.spec.image_tokens(width, height)

    def kept(self, policy: Any, image: ImageTokenCounts) -> int:
        """Prunable tokens of ``image`` that reach the LLM input in vLLM (the placeholders its processor
        reserves). Single-count methods and the shallow probe: ``kept_count(n, ratio)`` (the
        progressive ones pruned once at the LLM input to the count with the same LLM FLOPs as their
        layer-averaged ratio, ``vlmprune.vllm_plugin.common.prunable_keep``). In-LLM route
        (:func:`vlmprune.methods.policy_in_llm`): TransPrune keeps every token at the input, AIM its merge count; the
        stages inside the LLM are :meth:`stages`."""
        if policy_in_llm(policy, self.family):
            from vlmprune.reduction.stages import served_input_count

            return served_input_count(policy, image.prunable, self.lm.layers)
        return image.kept(policy.ratio)

    def stages(self, policy: Any, image: ImageTokenCounts) -> list[tuple[int, int]]:
        """``(after_layer, prunable tokens kept)`` per in-LLM stage of ``image`` ([] when not in-LLM)."""
        if not policy_in_llm(policy, self.family):
            return []
        from vlmprune.reduction.stages import served_in_llm_stages

        return [(layer, counts[0]) for layer, counts in served_in_llm_stages(policy, [image.prunable], self.lm.layers)]

    def cost(self, images: list[ImageTokenCounts], policy: Any, n_text: int, n_instruction: int = 0) -> RequestCost:
        """Visual tokens in/kept and analytic prefill FLOPs at ratio 0 and under ``policy`` (pruned
        at the LLM input, as in vLLM: every decoder layer sees the kept tokens; probe costs
        included, ``in_llm=False``)."""
        from vlmprune.flops import method_probe_flops, prefill_flops, projector_flops, vision_tower_flops

        ratio = policy.ratio
        visual_in = sum(t.prunable for t in images)
        kept = sum(self.kept(policy, t) for t in images)
        total0 = sum(t.total for t in images)
        total1 = kept + sum(t.newline for t in images)
        in_llm = policy_in_llm(policy, self.family)
        if in_llm:  # per-layer counts of the schedule, no probe term (scores come from the LLM's own layers)
            from vlmprune.flops import method_visual_per_layer

            per_layer = [0] * self.lm.layers
            for t in images:
                counts = method_visual_per_layer(policy.method, ratio, t.prunable, self.lm.layers, policy)
                per_layer = [a + b + t.newline for a, b in zip(per_layer, counts)]
            total1 = per_layer
        tower = probe = 0.0
        for t in images:
            vision = self.vision.with_grid(t.grid_thw) if t.grid_thw is not None else self.vision
            tower += vision_tower_flops(vision, t.views) + projector_flops(vision, t.views * vision.visual_tokens_per_view)
            probe += method_probe_flops(
                policy.method, ratio, self.lm, vision, t.prunable, n_instruction, t.views, policy, in_llm=in_llm
            )
        n_text = max(0, n_text)
        base = prefill_flops(self.lm, n_text, total0).total + tower
        actual = prefill_flops(self.lm, n_text, total1).total + tower + probe
        return RequestCost(visual_in=visual_in, visual_kept=kept, baseline_flops=base, actual_flops=actual)
