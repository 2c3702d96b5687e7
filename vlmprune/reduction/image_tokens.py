"""What one image's visual tokens are, for every backend: tensors, prunable mask, geometry, signals.

Both backends build an :class:`ImageTokens` per image (the transformers adapters in
:mod:`vlmprune.backends.hf`, the vLLM model subclasses in :mod:`vlmprune.vllm_plugin`) and hand it
to :func:`vlmprune.reduction.reduce.reduce_image`. The signal names below are the keys of
``ImageTokens.signals``; which of them a method needs is :func:`vlmprune.reduction.reduce.signals_needed`.
"""

from __future__ import annotations

from collections.abc import Callable
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
VISION_FEATURES = "vision_features"
"""(n, c_vision) LLaVA family: the projector's input (the selected CLIP layer's patch features).
AIM merges these and projects the merged tokens (:attr:`ImageTokens.project`), as its official code."""


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
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    """LLaVA family: the multimodal projector, (m, c_vision) -> (m, d_lm), so that a merger can
    average ``signals[VISION_FEATURES]`` and project afterwards (AIM). None where the features
    merged are the LLM's own input (Qwen: the patch merger is part of the vision tower)."""

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Prunable tokens per view: LLaVA-NeXT's thumbnail, then each crop (row-major, 0 for an
        all-padding crop); one view otherwise (the budget unit of :func:`vlmprune.policy.view_kept_counts`)."""
        if self.view is None or self.crop is None or self.crop_grid is None:
            return (self.n_prunable,)
        view_of = self.view_key()
        return tuple(int((view_of == v).sum()) for v in range(1 + self.crop_grid[0] * self.crop_grid[1]))

    def view_key(self) -> torch.Tensor:
        """(n,) long: each token's view in :attr:`view_sizes` order (0 = thumbnail, 1 + k = crop k);
        -1 for always-kept tokens."""
        if self.view is None or self.crop is None:
            return torch.where(self.prunable.bool(), 0, -1)
        return torch.where(self.view == 1, self.crop + 1, self.view)
