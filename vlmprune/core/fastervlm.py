"""FasterVLM: keep the visual tokens the vision tower's [CLS] attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818. Reference implementation: github.com/Theia-4869/FasterVLM
(commit f5d5f12).

Score: head-mean [CLS] -> patch softmax attention of the penultimate ViT layer (computed from q/k by
:func:`vlmprune.signals.cls_attention_from_qk`; mean attention received on Qwen). Budget ``keep`` =
number of *prunable* tokens kept, from :func:`vlmprune.policy.kept_count`; non-prunable tokens
(LLaVA-NeXT newlines) are always kept, so ``count == keep + n_non_prunable`` always.
"""

from __future__ import annotations

import torch

from vlmprune.core.select import TokenReduction, allocate_exact, topk_sorted


def reduce(
    scores: torch.Tensor,
    prunable: torch.Tensor,
    keep: int,
    groups: torch.Tensor | None = None,
) -> TokenReduction:
    """Top-``keep`` prunable tokens by score (per view when ``groups`` is given), raster order.

    ``scores`` (n,), ``prunable`` (n,) bool, ``groups`` (n,) long (LLaVA-NeXT: 0 base view,
    1 crops, -1 newline). With groups, ``keep`` is split over the groups in proportion to their
    prunable counts (FasterVLM budgets each view separately), then top-k inside each group.
    """
    n = scores.shape[0]
    if scores.ndim != 1 or prunable.shape != (n,):
        raise ValueError(
            f"scores and prunable must both be (n,), got {tuple(scores.shape)} and {tuple(prunable.shape)}"
        )
    prunable = prunable.bool()
    n_prunable = int(prunable.sum())
    if not 0 <= keep <= n_prunable:
        raise ValueError(f"keep must be in [0, {n_prunable}] (the prunable tokens), got {keep}")
    if keep == n_prunable:
        return TokenReduction.identity(n, device=scores.device)

    # 1. Split the budget over groups (one group when none are given).
    if groups is None:
        group_ids = [None]
        budgets = [keep]
    else:
        if groups.shape != (n,):
            raise ValueError(f"groups must be (n,) = ({n},), got {tuple(groups.shape)}")
        group_ids = torch.unique(groups[prunable]).tolist()
        sizes = torch.tensor([int((prunable & (groups == g)).sum()) for g in group_ids])  # (G,)
        budgets = allocate_exact(keep, sizes.double(), sizes).tolist()

    # 2. Top-k inside each group; non-prunable tokens always survive.
    keep_mask = ~prunable  # (n,)
    for gid, budget in zip(group_ids, budgets):
        member = prunable if gid is None else prunable & (groups == gid)
        idx = member.nonzero().squeeze(1)  # (n_g,)
        chosen = idx[topk_sorted(scores[idx], int(budget))]
        keep_mask[chosen] = True
    return TokenReduction(index=keep_mask.nonzero().squeeze(1))


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Batched top-``keep`` indices per row, ascending: (B, N) -> (B, keep). For the vLLM path."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got {tuple(scores.shape)}")
    return topk_sorted(scores, keep)
