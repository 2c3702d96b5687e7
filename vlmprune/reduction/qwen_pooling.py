"""Qwen's score pooling: per-patch ViT scores -> one score per merged LLM token.

Qwen2-VL / Qwen2.5-VL's PatchMerger turns each 2x2 group of neighbouring patches into one LLM
token, so a per-patch signal (the attention a patch receives) is pooled over the same groups before
it ranks the merged tokens. Both backends' Qwen paths use it.
"""

from __future__ import annotations

import torch


def pool_merge_groups(patch_scores: torch.Tensor, merge_unit: int) -> torch.Tensor:
    """(T,) per-patch scores -> (N,) per merged token: mean over each run of ``merge_unit``
    consecutive patches, the grouping PatchMerger's ``view(-1, merge_unit * C)`` applies."""
    if patch_scores.ndim != 1 or patch_scores.shape[0] % merge_unit:
        raise ValueError(
            f"patch scores must be (T,) with T divisible by {merge_unit}, got {tuple(patch_scores.shape)}"
        )
    return patch_scores.view(-1, merge_unit).mean(dim=1)
