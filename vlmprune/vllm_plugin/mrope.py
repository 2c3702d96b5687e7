"""Qwen's M-RoPE positions under pruning: the vLLM plugin's convention, position channels and recompute.

M-RoPE positions (the convention, identical to the reference backend): every kept (or merged)
token keeps the (t, h, w) id it has in the unpruned sequence (a merged token the id of the token it
stands for), and text keeps its unpruned id too: the text after an image starts at
``base + max(t, h, w)`` (Qwen's own rule, ``base`` = id of ``<|vision_start|>`` + 1) whatever was
kept, so only the image tokens' ids depend on the decision. This is done through vLLM's own
pruning hooks:

- ``get_mrope_input_positions`` (initial positions, before the encoder runs) walks the *placeholder
  lengths* (the stock walk assumes the unpruned grid and overshoots) and writes the final ids of
  all text; each pruned image run gets a provisional prefix of its grid (its first token's ids are
  exactly ``base``, which the recompute below relies on).
- ``embed_multimodal`` appends :data:`POSITION_CHANNELS` channels to every image/video row (the
  EVS protocol: the runner strips them): the row's (t, h, w) and its row index in the placeholder
  run, each split as ``hi * 128 + lo`` so that the values stay exact in bfloat16.
- ``recompute_mrope_positions`` (``SupportsMultiModalPruning``; called by the runner for every
  prefill chunk that holds image rows) writes ``base + (t, h, w)`` for exactly those rows. Text ids
  are never rewritten, so prefix-cache hits and chunk boundaries anywhere (inside an image, right
  after ``<|vision_start|>``, between images) need no special case.

vLLM's EVS recompute (``vllm.multimodal.video_prune.evs.recompute_mrope_positions``) is deliberately
not used: it restarts the text after a media item at ``base + llm_grid_w`` (a different id from
Qwen's ``max(t, h, w)`` for portrait images and videos) and it mis-assigns media to runs when a
chunk starts between two images. At ratio 0 the positions here equal stock vLLM's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

POSITION_CHANNELS = 8
"""Channels appended to every media row: (t, h, w, row) each as (hi, lo), value = hi * 128 + lo."""
_SPLIT = 128


def grid_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> np.ndarray:
    """(3, t*h*w) int64 (t, h, w) ids of a merged-token grid relative to its base, in LLM order.

    ``h``, ``w`` are merged-grid sizes. Exactly stock ``get_mrope_input_positions``'s grid (the
    temporal id is ``int(t_index * t_factor)``, ``t_factor`` = seconds per grid x tokens per second).
    """
    grid = np.indices((t, h, w)).reshape(3, -1)
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return grid.astype(np.int64)


def encode_position_channels(thw: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 3) ids + (n,) row indices -> (n, POSITION_CHANNELS) in ``dtype`` (exact for ids < 32768)."""
    values = torch.cat([thw.long(), rows.long()[:, None]], dim=1)  # (n, 4)
    if bool((values < 0).any()) or bool((values >= _SPLIT * 256).any()):
        raise ValueError(f"position ids must be in [0, {_SPLIT * 256}), got max {int(values.max())}")
    hi, lo = values // _SPLIT, values % _SPLIT
    return torch.stack([hi, lo], dim=2).reshape(values.shape[0], POSITION_CHANNELS).to(dtype)


def decode_position_channels(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_position_channels`: ((n, 3) long ids, (n,) long row indices)."""
    pairs = channels.float().round().long().reshape(channels.shape[0], 4, 2)
    values = pairs[..., 0] * _SPLIT + pairs[..., 1]  # (n, 4)
    return values[:, :3], values[:, 3]


def mrope_input_positions(
    num_tokens: int, media: Sequence[tuple[int, int, int, int, int, float]]
) -> tuple[torch.Tensor, int]:
    """Initial (3, L) positions and the decode delta for a prompt of ``num_tokens`` tokens.

    ``media``: per item ``(offset, length, t, h, w, t_factor)`` sorted by offset (merged grid
    sizes; ``length`` = placeholder run). Text ids are final; a run shorter than its grid gets the
    grid's first ``length`` cells (provisional; the recompute writes the kept ones). With full runs
    this is exactly stock vLLM's ``get_mrope_input_positions``.
    """
    parts: list[np.ndarray] = []
    cursor, next_id = 0, 0
    for offset, length, t, h, w, t_factor in media:
        text_len = offset - cursor
        if text_len < 0:
            raise ValueError(f"media item at offset {offset} overlaps the previous one (ends at {cursor})")
        parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_id)
        base = next_id + text_len
        grid = grid_positions(t, h, w, t_factor)  # (3, t*h*w)
        if not 0 < length <= grid.shape[1]:
            raise ValueError(f"a placeholder run of {length} tokens does not fit a grid of {grid.shape[1]}")
        parts.append(grid[:, :length] + base)
        next_id = base + int(grid.max()) + 1  # Qwen's rule: the text after continues past the grid
        cursor = offset + length
    if cursor < num_tokens:
        text_len = num_tokens - cursor
        parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_id)
    positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    if positions.shape[1] != num_tokens:
        raise ValueError(f"media runs end at {cursor}, past the prompt's {num_tokens} tokens")
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)), delta


def recompute_positions(
    input_ids: torch.Tensor,
    media_channels: Sequence[torch.Tensor],
    positions: torch.Tensor,
    num_computed_tokens: int,
    media_token_ids: Sequence[int],
) -> tuple[torch.Tensor, int]:
    """Write the final ids of the media rows of one prefill chunk; (3, L) positions and delta.

    ``media_channels``: per media item overlapping the chunk, in prompt order, the position
    channels of its rows in this chunk (a slice of the item's rows, see the runner's
    ``_gather_mm_embeddings``). The first item may continue a run begun in an earlier chunk (its
    first row index says where); every later one starts a new run at the next media token. A run's
    ``base`` is the temporal id of its first token (exact for images, t = 0, and unpruned videos,
    whose first row is at t = 0), which both the initial positions and this function preserve.
    """
    positions = positions.clone()
    if not media_channels:
        return positions, int(positions.max()) + 1 - positions.shape[1]
    ids = input_ids.to(positions.device).long().reshape(-1)  # (L,)
    is_media = torch.zeros_like(ids, dtype=torch.bool)
    for token in media_token_ids:
        is_media |= ids == token
    media_index = is_media.nonzero().squeeze(1)  # (M,) ascending
    cursor = int(num_computed_tokens)
    for channels in media_channels:
        if channels.shape[0] == 0:
            continue
        thw, rows = decode_position_channels(channels)  # (n, 3), (n,)
        thw, rows = thw.to(positions.device), rows.to(positions.device)
        first = int(rows[0])
        if first > 0:  # continues a run that began before this chunk
            run_start = cursor - first
        else:
            later = media_index[media_index >= cursor]
            if later.numel() == 0:
                raise RuntimeError(f"vlmprune: no media token at or after index {cursor} for a media item")
            run_start = int(later[0])
        start, end = run_start + first, run_start + first + thw.shape[0]
        if run_start < 0 or end > ids.shape[0] or not bool(is_media[start:end].all()):
            raise RuntimeError(f"vlmprune: media rows [{start}, {end}) do not land on media tokens")
        base = positions[0, run_start]
        positions[:, start:end] = (thw + base).T
        cursor = end
    return positions, int(positions.max()) + 1 - positions.shape[1]
