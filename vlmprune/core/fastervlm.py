"""FasterVLM: keep the visual tokens the vision tower's [CLS] attends to most.

Paper: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818. Reference implementation: github.com/Theia-4869/FasterVLM
(commit f5d5f12).

Score: head-mean [CLS] -> patch softmax attention of the penultimate ViT layer (computed from q/k by
:func:`vlmprune.signals.cls_attention_from_qk`; mean attention received on Qwen). Budget ``keep`` =
number of *prunable* tokens kept, from :func:`vlmprune.policy.kept_count`; on LLaVA-NeXT one budget
per view (thumbnail and each crop, :func:`vlmprune.policy.view_kept_counts`), as the official code
takes the top ``T`` of every view. Non-prunable tokens (LLaVA-NeXT newlines) are always kept, so
``count == sum(keep) + n_non_prunable`` always. Deviation: the official LLaVA-NeXT run uses
``spatial`` merging (no unpadding, no newlines, fixed 672 px grid); here each crop's budget is
``kept_count`` of the tokens it keeps after unpadding (equal to the official ``T`` on unpadded
crops), and newlines are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmprune.core.select import TokenReduction, topk_sorted


def reduce(
    scores: torch.Tensor,
    prunable: torch.Tensor,
    keep: int | Sequence[int],
    groups: torch.Tensor | None = None,
) -> TokenReduction:
    """Top-``keep`` prunable tokens by score (per view when ``groups`` is given), raster order.

    ``scores`` (n,), ``prunable`` (n,) bool. Without ``groups``, ``keep`` is one int. With
    ``groups`` (n,) long (each prunable token's view, 0..G-1; LLaVA-NeXT: 0 thumbnail, 1 + k crop
    k), ``keep`` lists G budgets, one per view (:func:`vlmprune.policy.view_kept_counts`): the
    official code takes the top ``T`` of every view separately, so views never compete.
    """
    n = scores.shape[0]
    if scores.ndim != 1 or prunable.shape != (n,):
        raise ValueError(
            f"scores and prunable must both be (n,), got {tuple(scores.shape)} and {tuple(prunable.shape)}"
        )
    prunable = prunable.bool()

    # 1. One budget per group (a single group when none are given).
    if groups is None:
        if not isinstance(keep, int):
            raise ValueError("keep must be one int when no groups are given")
        members = [prunable]
        budgets = [keep]
    else:
        if groups.shape != (n,):
            raise ValueError(f"groups must be (n,) = ({n},), got {tuple(groups.shape)}")
        budgets = [int(k) for k in ([keep] if isinstance(keep, int) else keep)]
        members = [prunable & (groups == g) for g in range(len(budgets))]
        if sum(int(m.sum()) for m in members) != int(prunable.sum()):
            raise ValueError(f"groups must put every prunable token in one of the {len(budgets)} budgeted views")
    for member, budget in zip(members, budgets):
        if not 0 <= budget <= int(member.sum()):
            raise ValueError(f"keep must be in [0, {int(member.sum())}] (the view's prunable tokens), got {budget}")
    if sum(budgets) == int(prunable.sum()):
        return TokenReduction.identity(n, device=scores.device)

    # 2. Top-k inside each group; non-prunable tokens always survive.
    keep_mask = ~prunable  # (n,)
    for member, budget in zip(members, budgets):
        idx = member.nonzero().squeeze(1)  # (n_g,)
        chosen = idx[topk_sorted(scores[idx], budget)]
        keep_mask[chosen] = True
    return TokenReduction(index=keep_mask.nonzero().squeeze(1))


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Batched top-``keep`` indices per row, ascending: (B, N) -> (B, keep). For the vLLM path."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got {tuple(scores.shape)}")
    return topk_sorted(scores, keep)
