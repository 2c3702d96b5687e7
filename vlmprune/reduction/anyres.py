"""LLaVA-NeXT's AnyRes geometry, for the gateway's counts and both backends' image tokens.

An image is a base (thumbnail) view plus a ``rows x cols`` grid of crops, each its own ViT pass of
``h x w`` patches; the crops are stitched into one ``h*rows x w*cols`` grid, unpadding cuts the
same number of rows (or columns) from both ends, and a newline token ends every remaining row
(``spatial_unpad``). Both backends let the model's own packing function lay out a tensor of
*source indices* (``view * h*w + patch``, newline = -1) exactly like the features, then read every
row's view, crop and grid cell from it here (:func:`packed_image_tokens`); the gateway and vLLM's
processor split the unpadded grid into per-crop counts with :func:`crop_view_sizes`.

Import-light (torch is loaded by :func:`packed_image_tokens` only), so the gateway's token counts
(:mod:`vlmprune.geometry`) use it without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vlmprune.reduction.image_tokens import ImageTokens


def crop_view_sizes(side: int, crop_grid: tuple[int, int], unpadded_hw: tuple[int, int]) -> tuple[int, ...]:
    """Tokens each AnyRes crop keeps after unpadding, row-major over ``crop_grid`` (rows, cols).

    The crops tile a ``side*rows x side*cols`` feature grid; unpadding cuts the same number of rows
    (or columns) from both ends down to ``unpadded_hw`` (``unpad_image`` / vLLM's arithmetic), so
    a crop keeps the overlap of its tile with the centred ``unpadded_hw`` window.
    """
    rows, cols = crop_grid
    cut_h, cut_w = (side * rows - unpadded_hw[0]) // 2, (side * cols - unpadded_hw[1]) // 2

    def overlap(i: int, cut: int, length: int) -> int:
        return max(0, min((i + 1) * side, cut + length) - max(i * side, cut))

    return tuple(
        overlap(r, cut_h, unpadded_hw[0]) * overlap(c, cut_w, unpadded_hw[1]) for r in range(rows) for c in range(cols)
    )


def source_indices(views: int, patches: int, dtype: Any = None) -> torch.Tensor:
    """(views, patches, 1): each view's patches numbered ``view * patches + patch``, the tensor a
    model's packing function lays out like the features (newline rows get -1)."""
    import torch

    return torch.arange(views * patches, dtype=dtype or torch.float64).view(views, patches, 1)


def packed_image_tokens(
    features: torch.Tensor,
    sources: torch.Tensor,
    signals: dict[str, torch.Tensor],
    grid: tuple[int, int],
    crop_grid: tuple[int, int],
    project: Any = None,
) -> ImageTokens:
    """One image's :class:`ImageTokens` from its packed rows.

    ``features`` (n, d) packed rows; ``sources`` (n,) long, each row's source index (-1: newline);
    ``signals`` per view of this image, ``(views, P)`` or ``(views, P, C)``; ``grid`` (h, w)
    patches per view; ``project``: the projector (AIM's pre-projector merge on LLaVA).
    Coordinates are in the stitched crop grid with the unpadding cut removed (they start at 0).
    """
    import torch

    from vlmprune.reduction.image_tokens import ImageTokens

    h, w = grid
    patches = h * w
    device = features.device
    newline = sources < 0  # (n,)
    src = sources.clamp_min(0)
    view_idx = src // patches  # 0 = base view, k >= 1 = crop k - 1
    patch = src % patches
    crop = torch.where(newline | (view_idx == 0), -1, view_idx - 1)  # (n,)
    view = torch.where(newline, -1, (view_idx > 0).long())  # (n,)
    gw = crop_grid[1]
    rows = torch.where(view == 1, crop.clamp_min(0) // gw * h, 0) + patch // w
    cols = torch.where(view == 1, crop.clamp_min(0) % gw * w, 0) + patch % w
    coords = torch.stack([rows, cols], dim=-1)  # (n, 2), stitched grid before unpadding
    coords[newline] = -1
    in_crops = view == 1
    rows1 = cols1 = 0
    if in_crops.any():
        # Unpadding cut leading rows (or columns): shift the crop grid to start at 0.
        coords[in_crops] -= coords[in_crops].min(dim=0).values
        rows1, cols1 = (int(x) + 1 for x in coords[in_crops].max(dim=0).values)
    token_signals = {}
    for name, value in signals.items():
        flat = value.reshape(-1, *value.shape[2:])  # (views * P,) or (views * P, C)
        picked = flat[src.to(flat.device)]
        picked[newline.to(flat.device)] = 0
        token_signals[name] = picked.to(device)
    return ImageTokens(
        features=features,
        prunable=(~newline).to(device),
        grid=grid,
        signals=token_signals,
        view=view.to(device),
        crop=crop.to(device),
        coords=coords.to(device),
        view_shape=[(h, w), (rows1, cols1)],
        crop_grid=crop_grid,
        project=project,
    )
