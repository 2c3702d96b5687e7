"""AIM: ToMe-style token merging before the LLM, PageRank importance pruning inside it.

Paper: "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
arXiv 2412.03248 (ICCV'25). Reference implementation: github.com/LaVi-Lab/AIM (commit edc24e9),
merging after ToMe (github.com/facebookresearch/ToMe, ``tome/merge.py``).

Budget: ``target`` / ``keep`` = tokens left, from :func:`vlmprune.policy.kept_count` (through the
schedule in :mod:`vlmprune.core.schedule`; its last stage keeps 0 visual tokens, as the official
schedule). What is merged: on LLaVA-1.5 / LLaVA-NeXT the projector's input (CLIP features of the
selected layer, metric: the last ViT layer's keys), projected afterwards, as the official code;
on Qwen2-VL / Qwen2.5-VL the patch merger's output (the merger is part of the vision tower, so its
output is what the LLM reads; the official Qwen code merges video tokens there too). Deviation, on
purpose: merged tokens come out in raster order of the token each stands for; AIM's output order
(unmerged A by similarity, then B) is not kept, so positions stay meaningful. Every deviation and
its measured effect: ``vlmprune/core/FIDELITY.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmprune.core.select import TokenReduction, topk_sorted


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the ``r`` A tokens most similar to a B token into it (one ToMe step on one image).

    ``x`` (n, C) features, ``metric`` (n, C') similarity features; A = even positions, B = odd.
    Each merged group becomes the plain mean of its members (B plus the A tokens merged into it).
    Returns (features (n-r, C), metric (n-r, C'), representative index (n-r,)), ascending by index:
    B tokens stand for their own position, unmerged A tokens for theirs.
    """
    n = x.shape[0]
    if metric.shape[0] != n:
        raise ValueError(f"x and metric disagree in length: {n} vs {metric.shape[0]}")
    if not 0 <= r <= n // 2:
        raise ValueError(f"r must be in [0, {n // 2}] for {n} tokens, got {r}")
    positions = torch.arange(n, device=x.device)
    if r == 0:
        return x, metric, positions

    # 1. Cosine similarity between the two alternating sets.
    m = F.normalize(metric.float(), dim=-1)
    sim = m[0::2] @ m[1::2].T  # (nA, nB)
    best_sim, best_b = sim.max(dim=-1)  # (nA,)

    # 2. The r A tokens with the highest best-similarity are merged (ties -> lower index).
    order = torch.sort(best_sim, descending=True, stable=True).indices
    src = order[:r]  # (r,) A-local indices merged away
    dst = best_b[src]  # (r,) B-local partners

    # 3. Group mean over {B} + its merged A tokens (no size weighting, as in AIM).
    def merge(t: torch.Tensor) -> torch.Tensor:
        a, b = t[0::2].float(), t[1::2].float()
        total = b.index_add(0, dst, a[src])  # (nB, C)
        size = torch.ones(b.shape[0], device=t.device).index_add(0, dst, torch.ones(r, device=t.device))
        return (total / size[:, None]).to(t.dtype)

    merged_b, merged_bm = merge(x), merge(metric)

    # 4. Reassemble unmerged A + all B, ascending by original position.
    a_keep = torch.ones(x[0::2].shape[0], dtype=torch.bool, device=x.device)
    a_keep[src] = False
    rep = torch.cat([positions[0::2][a_keep], positions[1::2]])  # (n-r,)
    feats = torch.cat([x[0::2][a_keep], merged_b])
    metr = torch.cat([metric[0::2][a_keep], merged_bm])
    perm = torch.argsort(rep)
    return feats[perm], metr[perm], rep[perm]


def merge_to_count(x: torch.Tensor, metric: torch.Tensor, target: int) -> TokenReduction:
    """Repeat :func:`bipartite_merge` (at most half per step) until exactly ``target`` tokens remain.

    ``index`` = the original position each output stands for (composed across steps), ascending;
    ``features`` = merged features (n=target, C). ``target == n`` returns the identity.
    """
    n = x.shape[0]
    if not (1 if n else 0) <= target <= n:
        raise ValueError(f"target must be in [1, {n}] for {n} tokens, got {target}")
    if target == n:
        return TokenReduction.identity(n, device=x.device)
    rep = torch.arange(n, device=x.device)
    while x.shape[0] > target:
        r = min(x.shape[0] - target, x.shape[0] // 2)
        x, metric, local = bipartite_merge(x, metric, r)
        rep = rep[local]
    return TokenReduction(index=rep, features=x)


def pagerank_importance(logits: torch.Tensor, temperature: float = 0.1, iterations: int = 5) -> torch.Tensor:
    """AIM's token importance from one layer's causal-masked logits (H, L, L); (L,).

    M = softmax(logits / temperature) per head (fp32); v starts uniform and is propagated
    v <- v @ M ``iterations`` times (no damping); importance = RMS over heads of v: how much
    attention a token receives under all-token propagation.

    ``logits`` may also be (H, n, L), n <= L: the last ``n`` query rows of a causal sequence of
    ``L`` (its first rows cached elsewhere, e.g. an earlier prefill chunk in vLLM); the result is
    then the exact importance of those ``n`` tokens, (n,): causally, no earlier row attends to them,
    so their mass comes from these rows alone (v still starts at 1/L).
    """
    if logits.ndim != 3 or logits.shape[1] > logits.shape[2]:
        raise ValueError(f"logits must be (H, L, L) or (H, n <= L, L), got {tuple(logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h, n, length = logits.shape
    m = torch.softmax(logits.float() / temperature, dim=-1)[..., length - n :]  # (H, n, n)
    v = torch.full((h, 1, n), 1.0 / length, dtype=torch.float32, device=logits.device)  # (H, 1, n)
    for _ in range(iterations):
        v = v @ m
    return v.squeeze(1).pow(2).mean(dim=0).sqrt()


def prune(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` most important tokens, ascending."""
    return topk_sorted(importance, keep)
