"""GlobalCom2: the thumbnail's [CLS] map sets each AnyRes crop's budget and guides its scores.

Paper: "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs
Acceleration" (Global Compression Commander), arXiv 2501.05179. Reference implementation:
github.com/xuyang-liu16/GlobalCom2 (commit 96b2d00).

Scores are the head-mean *pre-softmax* [CLS] logits of the last ViT layer (the reference code's
choice; crop sums and L2 normalisation depend on that scale). ``keep`` = number of prunable
tokens kept (from :func:`vlmprune.policy.kept_count`); the paper's adaptive per-crop counts are
redistributed so that they sum to ``keep`` exactly, because serving fixes the count before the
encoder runs. Newline tokens are always kept.

Deviation, on purpose: every output is in raster order. The reference code emits the thumbnail's
survivors in descending-score order; we keep them in their spatial order like the crops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmprune.core.select import TokenReduction, allocate_exact, topk_sorted


def crop_budgets(
    thumb_scores: torch.Tensor,
    crop_grid: tuple[int, int],
    crop_capacity: torch.Tensor,
    thumb_capacity: int,
    total: int,
    temperature: float = 10.0,
) -> tuple[int, torch.Tensor]:
    """Integer budgets (thumbnail, per crop (n,)) summing exactly to ``total``.

    ``thumb_scores`` (rows, cols): the thumbnail's [CLS] logits; patch (r, c) covers crop
    (r*gh//rows, c*gw//cols), crop ids row-major. ``crop_capacity`` (n,) tokens per crop.
    """
    if thumb_scores.ndim != 2:
        raise ValueError(f"thumb_scores must be (rows, cols), got {tuple(thumb_scores.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gh, gw = crop_grid
    n = gh * gw
    if n <= 0 or crop_capacity.shape != (n,):
        raise ValueError(f"crop_capacity must be ({n},) for crop_grid {crop_grid}, got {tuple(crop_capacity.shape)}")
    cap = crop_capacity.long().cpu()
    capacity_total = thumb_capacity + int(cap.sum())
    if not 0 <= total <= capacity_total:
        raise ValueError(f"total must be in [0, {capacity_total}], got {total}")
    if capacity_total == 0:
        return 0, torch.zeros(n, dtype=torch.long)

    # 1. Thumbnail score mass over each crop's footprint.
    rows, cols = thumb_scores.shape
    r = torch.arange(rows) * gh // rows  # (rows,)
    c = torch.arange(cols) * gw // cols  # (cols,)
    crop_of = (r[:, None] * gw + c[None, :]).flatten()  # (rows*cols,)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, crop_of, thumb_scores.detach().double().cpu().flatten())

    # 2. Paper's retention per crop: R * (1 + p_j - 1/n), p = softmax(S / tau), clipped at 1.
    p = torch.softmax((sums - sums.max()) / temperature, dim=0)  # (n,)
    ratio = total / capacity_total
    raw_thumb = ratio * thumb_capacity
    raw_crops = (ratio * (1.0 + p - 1.0 / n)).clamp(max=1.0) * cap.double()  # (n,)

    # 3. Integerise so the budgets sum to ``total`` exactly, each within its capacity.
    weights = torch.cat([torch.tensor([raw_thumb], dtype=torch.float64), raw_crops])
    capacity = torch.cat([torch.tensor([thumb_capacity]), cap])
    budgets = allocate_exact(total, weights, capacity)
    return int(budgets[0]), budgets[1:]


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def reduce(
    scores: torch.Tensor,
    view: torch.Tensor,
    crop: torch.Tensor,
    coords: torch.Tensor,
    view_shape: list[tuple[int, int]],
    crop_grid: tuple[int, int],
    keep: int,
    temperature: float = 10.0,
    alpha: float = 0.5,
) -> TokenReduction:
    """GlobalCom2 selection over one LLaVA-NeXT image's tokens; index ascending, newlines kept.

    ``scores`` (n,) [CLS] logits (base tokens from the thumbnail pass, crop tokens from their own
    crop's pass); ``view``/``crop``/``coords`` as in :class:`vlmprune.reduction.image_tokens.ImageTokens`.
    Crop token score = alpha * l2norm(local) + (1 - alpha) * l2norm(global), global = the thumbnail
    map bilinearly resized to ``view_shape[1]`` and read at the token's coords.
    """
    n = scores.shape[0]
    if scores.ndim != 1 or view.shape != (n,) or crop.shape != (n,) or coords.shape != (n, 2):
        raise ValueError("scores, view, crop must be (n,) and coords (n, 2)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    device = scores.device
    prunable = view >= 0
    n_prunable = int(prunable.sum())
    if not 0 <= keep <= n_prunable:
        raise ValueError(f"keep must be in [0, {n_prunable}] (the prunable tokens), got {keep}")
    if keep == n_prunable:
        return TokenReduction.identity(n, device=device)
    gh, gw = crop_grid
    n_crops = gh * gw
    base = (view == 0).nonzero().squeeze(1)  # (n_base,)
    in_crops = (view == 1).nonzero().squeeze(1)  # (n_crop_tokens,)
    crop_ids = crop[in_crops]
    if in_crops.numel() and (int(crop_ids.min()) < 0 or int(crop_ids.max()) >= n_crops):
        raise ValueError(f"crop ids of view-1 tokens must be in [0, {n_crops}) for crop_grid {crop_grid}")

    # 1. Thumbnail map (rows0, cols0) from the base tokens' scores.
    rows0, cols0 = view_shape[0]
    if base.numel() != rows0 * cols0:
        raise ValueError(f"{base.numel()} base tokens do not fill view_shape[0] = {view_shape[0]}")
    thumb = torch.zeros(rows0, cols0, dtype=torch.float32, device=device)
    thumb[coords[base, 0], coords[base, 1]] = scores[base].float()

    # 2. Budgets: thumbnail + each crop, summing exactly to ``keep``.
    crop_cap = torch.bincount(crop_ids.cpu(), minlength=n_crops)  # (n_crops,)
    thumb_budget, budgets = crop_budgets(thumb, crop_grid, crop_cap, int(base.numel()), keep, temperature)

    keep_mask = ~prunable  # newlines always survive
    keep_mask[base[topk_sorted(scores[base], thumb_budget)]] = True

    # 3. Global guidance: thumbnail map resized to the stitched crop grid.
    if in_crops.numel():
        rows1, cols1 = view_shape[1]
        global_map = F.interpolate(thumb[None, None], size=(rows1, cols1), mode="bilinear", align_corners=False)[0, 0]
        global_scores = global_map[coords[in_crops, 0], coords[in_crops, 1]]  # (n_crop_tokens,)
        for j in range(n_crops):
            budget = int(budgets[j])
            if budget == 0:
                continue
            member = (crop_ids == j).nonzero().squeeze(1)
            local = scores[in_crops[member]].float()
            combined = alpha * _l2norm(local) + (1.0 - alpha) * _l2norm(global_scores[member])
            keep_mask[in_crops[member[topk_sorted(combined, budget)]]] = True
    return TokenReduction(index=keep_mask.nonzero().squeeze(1))
