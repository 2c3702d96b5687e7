"""Per-method costs: visual tokens entering each decoder layer (the image's plan) and scoring FLOPs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlmprune.flops.counting import AttentionMode, FlopsBreakdown, LMHeadMode, lm_layer_flops, prefill_flops
from vlmprune.flops.shapes import LMGeometry, ModelGeometry, VisionGeometry


# ---------------------------------------------------------------------------------------------
# Methods: token counts per layer and probe costs
# ---------------------------------------------------------------------------------------------


def _resolve_policy(method: str, ratio: float, policy: Any):
    from vlmprune.policy import PolicyError, parse_policy

    if policy is None:
        return parse_policy({"method": method}, ratio=ratio)
    if isinstance(policy, Mapping):
        policy = {"method": method, **policy}
    resolved = parse_policy(policy, ratio=ratio)
    if resolved.method != method:
        raise PolicyError(f"policy is for method {resolved.method!r}, not {method!r}")
    return resolved


def method_visual_per_layer(
    method: str,
    ratio: float,
    n_visual: int,
    num_layers: int,
    policy: Any = None,
    *,
    in_llm: bool = True,
    view_sizes: Sequence[int] | None = None,
) -> list[int]:
    """Visual tokens entering each decoder layer under ``method`` at ``ratio``.

    Progressive methods (transprune, aim, fastv) follow their schedule scaled to the layer-averaged
    ``ratio`` when ``in_llm`` (the transformers backend); with ``in_llm=False`` (the vLLM shallow
    probe, pruned at the LLM input) and for every other method, each layer sees
    ``image_kept_count(view_sizes, ratio)`` tokens (``kept_count`` of every view, summed;
    ``view_sizes`` defaults to one view of ``n_visual``). FastV has no LLM-input variant: it is
    counted in the LLM whatever ``in_llm`` says (every token before layer K, the kept ones after).
    ``ratio`` is bucketed as a policy would be. The counts are the image's plan's
    (:func:`vlmprune.reduction.plan.plan_image`, on the reference or the pre-LLM route).
    """
    from vlmprune.reduction.plan import plan_image

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    views = (n_visual,) if view_sizes is None else tuple(view_sizes)
    if sum(views) != n_visual:
        raise ValueError(f"view_sizes {views} do not sum to n_visual={n_visual}")
    resolved = _resolve_policy(method, ratio, policy)
    route = "reference" if in_llm or method == "fastv" else "pre_llm"
    return plan_image(resolved, "", views, num_layers, route=route).per_layer()


def cls_row_flops(vision: VisionGeometry, n_views: int = 1, layers: int = 1) -> float:
    """The single [CLS] query row ``q_cls . K^T`` over all heads: ``2 * N * d`` per layer used."""
    return float(2 * vision.seq_len * vision.hidden * layers * n_views)


def attention_rows_flops(lm: LMGeometry, n_queries: int, n_keys: int) -> float:
    """Attention logits of ``n_queries`` rows over ``n_keys`` keys, all heads (e.g. instruction->visual)."""
    return float(2 * n_queries * n_keys * lm.heads * lm.head_dim)


def pagerank_flops(heads: int, n_tokens: int, iterations: int, head_dim: int | None = None) -> float:
    """PageRank ``v <- v M`` over an ``n x n`` attention matrix per head; with ``head_dim``, also
    recompute the logits ``Q K^T`` (fused attention kernels never return them)."""
    cost = 2 * heads * n_tokens * n_tokens * iterations
    if head_dim is not None:
        cost += 2 * heads * n_tokens * n_tokens * head_dim
    return float(cost)


def shallow_probe_flops(lm: LMGeometry, n_tokens: int, layers: int, attention: AttentionMode = "causal") -> float:
    """The first ``layers`` decoder layers over ``n_tokens`` (visual + instruction), outside the cache."""
    return layers * lm_layer_flops(lm, n_tokens, attention)


def tome_merge_flops(n_tokens: int, keep: int, dim: int) -> float:
    """Bipartite-matching similarity (A x B cosine) for the merge rounds from ``n_tokens`` to ``keep``;
    each round removes at most half of the tokens."""
    cost = 0
    n = n_tokens
    while n > keep:
        cost += 2 * (n - n // 2) * (n // 2) * dim
        n = max(keep, n - n // 2)
    return float(cost)


def method_probe_flops(
    method: str,
    ratio: float,
    lm: LMGeometry,
    vision: VisionGeometry | None,
    n_visual: int,
    n_instruction: int,
    n_views: int = 1,
    policy: Any = None,
    *,
    in_llm: bool = True,
) -> float:
    """FLOPs spent only to decide what to compress (0 at ratio 0: nothing is scored).

    fastervlm/globalcom2: one [CLS] row per view (no [CLS] on Qwen: the full score matrix of one
    layer, for the mean attention received); aim: ToMe similarity (metric = tower width) + PageRank
    with recomputed logits at each pruning layer (``in_llm``) or after a shallow probe; transprune:
    instruction->visual rows at each pruning layer, or a shallow probe; fastv: the query rows of
    layer K-1 (the last prompt token, or ``n_instruction`` rows) over every token present there
    (its k are the layer's own; only the rows' scores are extra); explain: q/k projections
    of decoder layer 0 + instruction->visual rows; random/pool: 0.
    """
    resolved = _resolve_policy(method, ratio, policy)
    if resolved.ratio == 0.0 or n_visual == 0:
        return 0.0
    if method in ("fastervlm", "globalcom2"):
        if vision is None:
            return 0.0
        if vision.cls_token:
            return cls_row_flops(vision, n_views)
        return float(2 * vision.seq_len**2 * vision.hidden * n_views)
    if method == "explain":
        n = n_visual + n_instruction
        qk = 2 * n * lm.hidden * (lm.heads + lm.kv_heads) * lm.head_dim
        return float(qk) + attention_rows_flops(lm, n_instruction, n_visual)
    if method == "transprune":
        if not in_llm:
            return shallow_probe_flops(lm, n_visual + n_instruction, resolved.probe_layers) + (
                attention_rows_flops(lm, n_instruction, n_visual)
            )
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        cuts = [i for i in range(1, lm.layers) if per_layer[i] < per_layer[i - 1]]
        if per_layer[0] < n_visual:
            cuts.insert(0, 0)
        # scores use the tokens present before each cut
        return float(sum(attention_rows_flops(lm, n_instruction, per_layer[i - 1] if i else n_visual) for i in cuts))
    if method == "aim":
        if not in_llm:  # merge + prune at the LLM input, scored by PageRank after the shallow probe
            n = n_visual + n_instruction
            return shallow_probe_flops(lm, n, resolved.probe_layers) + pagerank_flops(
                lm.heads, n, resolved.pagerank_iterations, lm.head_dim
            )
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        cost = 0.0
        if vision is not None and per_layer[0] < n_visual:  # ToMe merging before the LLM
            cost += tome_merge_flops(n_visual, per_layer[0], vision.hidden)
        for i in range(1, lm.layers):  # PageRank over the tokens present where a layer prunes
            if per_layer[i] < per_layer[i - 1]:
                n = per_layer[i - 1] + n_instruction
                cost += pagerank_flops(lm.heads, n, resolved.pagerank_iterations, lm.head_dim)
        return cost
    if method == "fastv":  # always in the LLM (no probe variant)
        per_layer = method_visual_per_layer(method, ratio, n_visual, lm.layers, resolved)
        rows = 1 if resolved.query == "last" else n_instruction
        return float(sum(
            attention_rows_flops(lm, rows, per_layer[i - 1] + n_instruction)
            for i in range(1, lm.layers) if per_layer[i] < per_layer[i - 1]
        ))
    return 0.0  # random, pool


def method_prefill_flops(
    model: ModelGeometry,
    method: str,
    ratio: float,
    n_text: int = 64,
    *,
    n_views: int | None = None,
    policy: Any = None,
    in_llm: bool = True,
    attention: AttentionMode = "causal",
    lm_head: LMHeadMode = "last",
    include_vision: bool = True,
    include_probe: bool = True,
) -> FlopsBreakdown:
    """:func:`prefill_flops` of ``model``'s reference image under ``method`` at ``ratio``; the probe
    takes all ``n_text`` tokens as the instruction (an upper bound)."""
    views = model.n_views if n_views is None else n_views
    n_visual = views * model.vision.visual_tokens_per_view
    per_layer = method_visual_per_layer(
        method, ratio, n_visual, model.lm.layers, policy, in_llm=in_llm,
        view_sizes=(model.vision.visual_tokens_per_view,) * views,
    )
    probe = (
        method_probe_flops(method, ratio, model.lm, model.vision, n_visual, n_text, views, policy, in_llm=in_llm)
        if include_probe
        else 0.0
    )
    return prefill_flops(
        model.lm, n_text, per_layer, model.vision if include_vision else None, views, probe,
        attention=attention, lm_head=lm_head,
    )
