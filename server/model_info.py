"""What the gateway knows about the served model: family, visual-token geometry, FLOPs shape.

Read from the model directory (``config.json`` and the processor config) once; the counts come
from :mod:`vlmprune.geometry` (the plugin's own numbers) and the FLOPs from :mod:`vlmprune.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprune.geometry import ImageTokenCounts, ModelVisionSpec
from vlmprune.reduction.plan import ImagePlan, plan_image


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

    def plan(self, policy: Any, image: ImageTokenCounts) -> ImagePlan:
        """How the engine behind the gateway serves ``image`` under ``policy``: the same plan its
        processor computes (:func:`vlmprune.reduction.plan.plan_image`, on the route
        :func:`vlmprune.methods.served_route` gives in this process)."""
        return plan_image(policy, self.family, image.view_sizes or (image.prunable,), self.lm.layers,
                          fixed=image.newline)

    def cost(self, images: list[ImageTokenCounts], policy: Any, n_text: int, n_instruction: int = 0) -> RequestCost:
        """Visual tokens in/kept (entering the LLM) and analytic prefill FLOPs at ratio 0 and under
        ``policy``, each decoder layer counted with the tokens the images' plans give it (probe costs
        included on the probe route)."""
        from vlmprune.flops import method_probe_flops, prefill_flops, projector_flops, vision_tower_flops

        ratio = policy.ratio
        plans = [self.plan(policy, t) for t in images]
        visual_in = sum(t.prunable for t in images)
        kept = sum(p.entering for p in plans)
        total0 = sum(t.total for t in images)
        in_llm = any(p.route == "in_llm" for p in plans)
        # per-layer counts of the plans (in-LLM: no probe term, the scores come from the LLM's own layers)
        total1 = [sum(col) for col in zip(*([c + p.fixed for c in p.per_layer()] for p in plans))] or 0
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
