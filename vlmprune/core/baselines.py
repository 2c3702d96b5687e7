"""Field baselines: a seeded random subset and spatial average pooling, both to an exact count.

``keep`` = number of (prunable) tokens kept, from :func:`vlmprune.policy.kept_count`; the result's
count always equals it (plus the non-prunable tokens for :func:`random_reduce`).
"""

from __future__ import annotations

import math

import torch

from vlmprune.core.select import TokenReduction, allocate_exact


def random_reduce(prunable: torch.Tensor, keep: int, seed: int) -> TokenReduction:
    """A uniformly random ``keep`` of the prunable tokens (fixed by ``seed``) + every non-prunable one."""
    if prunable.ndim != 1:
        raise ValueError(f"prunable must be (n,), got {tuple(prunable.shape)}")
    prunable = prunable.bool()
    candidates = prunable.nonzero().squeeze(1)  # (n_prunable,)
    if not 0 <= keep <= candidates.numel():
        raise ValueError(f"keep must be in [0, {candidates.numel()}] (the prunable tokens), got {keep}")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(candidates.numel(), generator=generator)[:keep].to(prunable.device)
    keep_mask = ~prunable
    keep_mask[candidates[pick]] = True
    return TokenReduction(index=keep_mask.nonzero().squeeze(1))


def _bounds(i: int, size: int, parts: int) -> tuple[int, int]:
    """Adaptive-pooling cell ``i`` of ``parts`` over ``size``: [floor(i*size/parts), ceil((i+1)*size/parts))."""
    return (i * size) // parts, -((-(i + 1) * size) // parts)


def pool_reduce(features: torch.Tensor, grid: tuple[int, int], keep: int) -> TokenReduction:
    """Average-pool a (rows, cols) token grid into exactly ``keep`` rectangles, raster order.

    ``features`` (rows*cols, C) in raster order. The grid is cut into h' horizontal bands
    (h' ~ sqrt(keep * rows / cols)) with adaptive-pooling boundaries; ``keep`` cells are spread
    over the bands as evenly as possible and each band is cut into its cells the same way. Each
    output is its rectangle's mean and stands for the token at the rectangle's centre.
    """
    rows, cols = grid
    n = rows * cols
    if features.ndim != 2 or features.shape[0] != n:
        raise ValueError(f"features must be ({n}, C) for grid {grid}, got {tuple(features.shape)}")
    if not (1 if n else 0) <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}] for grid {grid}, got {keep}")
    if keep == n:
        return TokenReduction.identity(n, device=features.device)

    # 1. Number of bands: near-square cells, at most one row per band and one cell per band.
    bands = max(1, round(math.sqrt(keep * rows / cols)))
    bands = min(max(bands, 1), rows, keep)
    while keep > bands * cols:  # rounding must not ask a band for more cells than it has columns
        bands += 1
    per_band = allocate_exact(keep, torch.ones(bands), torch.full((bands,), cols)).tolist()

    # 2. Rectangle means and centre tokens, band by band (raster order).
    grid_feats = features.view(rows, cols, -1)
    outputs, index = [], []
    for b, cells in enumerate(per_band):
        r0, r1 = _bounds(b, rows, bands)
        band = grid_feats[r0:r1].float().mean(dim=0)  # (cols, C)
        centre_row = (r0 + r1 - 1) // 2
        for c in range(int(cells)):
            c0, c1 = _bounds(c, cols, int(cells))
            outputs.append(band[c0:c1].mean(dim=0))
            index.append(centre_row * cols + (c0 + c1 - 1) // 2)
    merged = torch.stack(outputs).to(features.dtype)  # (keep, C)
    return TokenReduction(index=torch.tensor(index, device=features.device), features=merged)
