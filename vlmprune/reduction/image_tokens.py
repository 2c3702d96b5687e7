"""What one image's visual tokens are, for every backend: tensors, prunable mask, geometry, signals.

Both backends build an :class:`ImageTokens` per image (the transformers adapters in
:mod:`vlmprune.backends.hf`, the vLLM model subclasses in :mod:`vlmprune.vllm_plugin`) and hand it
to :func:`vlmprune.reduction.reduce.reduce_image`. The signal names below are the keys of
``ImageTokens.signals``; which of them a method needs is :func:`vlmprune.reduction.reduce.signals_needed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Signal names (keys of ImageTokens.signals); each is per visual token, in LLM order.
CLS_ATTENTION = "cls_attention"
"""(n,) FasterVLM score: [CLS]->patch softmax attention, head mean, penultimate ViT layer.
Qwen (no [CLS]): mean attention each patch receives at a full-attention block, pooled 2x2 like
the merger. LLaVA-NeXT: each view scored by its own ViT pass. Always-kept tokens (newlines): 0."""
CLS_LOGITS = "cls_logits"
"""(n,) GlobalCom2 score: [CLS]->patch pre-softmax logits, head mean, last ViT layer."""
MERGE_METRIC = "merge_metric"
"""(n, c) AIM's merge similarity metric: CLIP last-layer keys (LLaVA), projected features (Qwen)."""


@dataclass
class ImageTokens:
    """One image's visual tokens as the LLM would see them without pruning."""

    features: torch.Tensor
    """(n, d_lm) projected features, in sequence order."""
    prunable: torch.Tensor
    """(n,) bool; False for tokens that are always kept (LLaVA-NeXT's image_newline tokens)."""
    grid: tuple[int, int]
    """(rows, cols) of the main token grid (LLaVA: 24x24; Qwen: merged h/2 x w/2; LLaVA-NeXT:
    the base/thumbnail view)."""
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    view: torch.Tensor | None = None
    """(n,) long, LLaVA-NeXT only: 0 = base/thumbnail view, 1 = the stitched, unpadded crop grid,
    -1 = image_newline token."""
    crop: torch.Tensor | None = None
    """(n,) long, LLaVA-NeXT only: which AnyRes crop (row-major in ``crop_grid``) a view-1 token
    comes from; -1 for base and newline tokens."""
    coords: torch.Tensor | None = None
    """(n, 2) long, LLaVA-NeXT only: (row, col) of each token inside its view's grid; -1 for newlines."""
    view_shape: list[tuple[int, int]] | None = None
    """LLaVA-NeXT only: (rows, cols) of view 0 and of view 1 (after unpadding)."""
    crop_grid: tuple[int, int] | None = None
    """LLaVA-NeXT only: (gh, gw), the AnyRes crop grid."""

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())
