"""The multimodal projector around AIM's pre-projector merge (LLaVA family), for both backends.

AIM's official code merges the projector's input (the selected CLIP layer's patch features,
``VISION_FEATURES``) and projects the merged tokens. :func:`projector_input_capture` records that
input around one forward; :func:`projection` is the ``ImageTokens.project`` callable. Plain
``torch.nn`` hooks on the model's projector module, so the transformers adapters
(:mod:`vlmprune.backends.hf`) and the vLLM model subclasses (:mod:`vlmprune.vllm_plugin`) share them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from vlmprune.reduction.image_tokens import VISION_FEATURES


@contextmanager
def projector_input_capture(projector: nn.Module, needs: frozenset[str], patches: int):
    """Record the multimodal projector's input around one forward when ``VISION_FEATURES`` is needed.

    Yields a callable returning ``{VISION_FEATURES: (B, P, C)}`` (``P = patches`` per ViT pass, in
    call order; ``{}`` when not needed: then no hook is installed).
    """
    if VISION_FEATURES not in needs:
        yield dict
        return
    inputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        inputs.append(args[0].detach())

    def read() -> dict[str, torch.Tensor]:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])  # (B * P, C)
        return {VISION_FEATURES: x.reshape(-1, patches, x.shape[-1])}

    handle = projector.register_forward_pre_hook(hook)
    try:
        yield read
    finally:
        handle.remove()


def projection(projector: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x (m, c_vision) -> projector(x) (m, d_lm)`` in the projector's dtype and device."""
    weight = next(projector.parameters())

    def project(x: torch.Tensor) -> torch.Tensor:
        return projector(x.to(weight.device, weight.dtype)[None])[0]

    return project
