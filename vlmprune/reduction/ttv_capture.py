"""TransPrune's token transition variation read from a decoder layer's sub-blocks, for both backends.

vLLM's and transformers' Llama / Qwen2 decoder layers name their sub-blocks alike
(``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``), so one set of forward
hooks records each sub-block's normed input and output (before the residual) in either engine.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.core import transprune

SUB_BLOCKS = (("attn_in", "input_layernorm"), ("attn_out", "self_attn"),
              ("mlp_in", "post_attention_layernorm"), ("mlp_out", "mlp"))


class SubBlockCapture:
    """Context manager: forward hooks on ``layer``'s sub-blocks while one forward runs.

    ``batched``: the layer's outputs carry a leading batch dimension of 1 (transformers), dropped;
    vLLM's are already ``(T, d)`` over the flattened batch.
    """

    def __init__(self, layer: Any, batched: bool = False) -> None:
        self.layer = layer
        self.batched = batched
        self.seen: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> SubBlockCapture:
        def keep(name: str):
            def hook(_module, _inputs, output):
                out = (output[0] if isinstance(output, tuple) else output).detach()
                self.seen[name] = out[0] if self.batched else out  # (L, d)

            return hook

        for name, attr in SUB_BLOCKS:
            self.handles.append(getattr(self.layer, attr).register_forward_hook(keep(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def ttv(self, direction: str, rows: slice = slice(None)) -> torch.Tensor:
        """Layer TTV of ``rows`` (L,) = TTV(attention) + TTV(FFN)."""
        s = self.seen
        attn = transprune.transition_variation(s["attn_in"][rows], s["attn_out"][rows], direction)
        ffn = transprune.transition_variation(s["mlp_in"][rows], s["mlp_out"][rows], direction)
        return attn + ffn
