"""The backend-neutral reduction layer, between the pure tensor functions and the two backends.

:mod:`vlmprune.core` holds one pure function per method; the backends
(:mod:`vlmprune.backends.hf`, the transformers reference backend, and :mod:`vlmprune.vllm_plugin`)
gather each image's tokens and signals from a model. This layer is what both share, so neither
backend imports the other:

- :mod:`~vlmprune.reduction.image_tokens`: what one image's visual tokens are (tensors, prunable
  mask, grid, views, crops, coordinates) and the signal names;
- :mod:`~vlmprune.reduction.reduce`: which signals a method needs, and policy + signals -> the
  reduction at the LLM input;
- :mod:`~vlmprune.reduction.stages`: the progressive schedules' stage plans;
- :mod:`~vlmprune.reduction.qwen_pooling`: Qwen's 2x2 score pooling;
- :mod:`~vlmprune.reduction.projector`: the LLaVA projector's input capture and projection (AIM's
  pre-projector merge).

It imports torch, :mod:`vlmprune.core`, the policy and the method registry, never vLLM,
transformers or FastAPI.
"""
