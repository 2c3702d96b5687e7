"""Pruning signals under vLLM's tensor parallelism: every rank must pick the same rows.

A tensor-parallel attention layer holds ``heads / tp`` heads per rank (vLLM's ``QKVParallelLinear``,
heads split in order: rank r holds the r-th contiguous block). The plugin's scores are means over
heads ([CLS] attention, attention received, instruction attention), so a rank's mean over its own
heads, summed across ranks and divided by the number of shards, is the mean over all heads (exact up
to the order of floating-point sums). Per-head tensors (keys, AIM's logits) are gathered in head
order. Every rank runs the same requests in the same order, so the collectives below pair up.

Qwen's data-parallel encoder (``--mm-encoder-tp-mode data``) instead gives each rank whole images
(``vllm.model_executor.models.vision.run_dp_sharded_mrope_vision_model``): the scores of the images
a rank encoded are gathered to every rank by :func:`gather_image_scores`.
"""

from __future__ import annotations

from typing import Sequence

import torch


def head_shards(local_heads: int, total_heads: int) -> int:
    """How many ranks share a layer's heads (1: every head on this rank)."""
    if local_heads <= 0 or total_heads % local_heads:
        raise ValueError(f"{local_heads} local heads do not divide {total_heads} heads evenly")
    return total_heads // local_heads


def attention_shards(attn) -> int:
    """How many ranks share the heads of a vLLM decoder attention module (``num_heads`` on this rank,
    ``total_num_heads`` in all)."""
    return head_shards(int(attn.num_heads), int(getattr(attn, "total_num_heads", attn.num_heads)))


def mean_over_shards(value: torch.Tensor, shards: int) -> torch.Tensor:
    """Per-rank means over local heads -> the mean over every head (the same tensor on all ranks)."""
    if shards == 1:
        return value
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(value.contiguous().clone()) / shards


def gather_heads(value: torch.Tensor, shards: int, dim: int) -> torch.Tensor:
    """Per-rank local heads (along ``dim``) -> every head, in head order."""
    if shards == 1:
        return value
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(value.contiguous(), dim=dim)


def data_parallel_images(sizes: Sequence[int]) -> list[list[int]]:
    """Per rank, the images (indices into ``sizes``, in that rank's encoding order) vLLM's
    data-parallel encoder gives it: the same assignment vLLM computes."""
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.model_executor.models.vision import get_load_balance_assignment

    tp = get_tensor_model_parallel_world_size()
    order, counts, _ = get_load_balance_assignment(list(sizes), tp)
    out, start = [], 0
    for count in counts:
        out.append([int(i) for i in order[start:start + count]])
        start += count
    return out


def gather_image_scores(local: Sequence[torch.Tensor], lengths: Sequence[int],
                        assignment: Sequence[Sequence[int]], rank: int, device: torch.device) -> list[torch.Tensor]:
    """Every image's score vector on every rank, from each rank's scores of its own images.

    ``local``: this rank's per-image scores, in ``assignment[rank]`` order; ``lengths``: every
    image's score length. Pads each rank's concatenation to the longest, gathers, unpads.
    """
    from vllm.distributed import tensor_model_parallel_all_gather

    if len(local) != len(assignment[rank]):
        raise RuntimeError(f"vlmprune: rank {rank} scored {len(local)} images, vLLM gave it {len(assignment[rank])}")
    per_rank = [sum(lengths[i] for i in images) for images in assignment]
    width = max(per_rank)
    flat = torch.cat([s.float() for s in local]) if local else torch.zeros(0, device=device)
    padded = torch.zeros(width, dtype=torch.float32, device=device)
    padded[: flat.shape[0]] = flat
    gathered = tensor_model_parallel_all_gather(padded[None], dim=0)  # (tp, width)
    out: list[torch.Tensor | None] = [None] * len(lengths)
    for r, images in enumerate(assignment):
        start = 0
        for i in images:
            out[i] = gathered[r, start:start + lengths[i]]
            start += lengths[i]
    missing = [i for i, s in enumerate(out) if s is None]
    if missing:
        raise RuntimeError(f"vlmprune: images {missing} were assigned to no rank")
    return out  # type: ignore[return-value]
