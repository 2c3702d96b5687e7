"""Progressive in-LLM pruning with real token removal (TransPrune, AIM's prune stage, FastV).

The official TransPrune code and FastV's ``fast_v_inplace`` branch drop tokens from the hidden
states between layers; AIM's official code only masks keys, so it saves no compute or memory
(PRUNERS.md §3(b), §7.3). Here every method physically removes the pruned tokens: after a stage,
the hidden states, the position ids and every *later* layer's KV cache hold only the kept tokens.
Earlier layers keep the keys of every token they saw, which is exactly what a cache-free
recomputation of the same pruned forward produces, so decoding with the cache is consistent
(:func:`forward_with_decisions` is that recomputation).

Each decoder layer runs through its own ``forward`` (any attention kernel); TransPrune's TTV is read
from forward hooks on the sub-blocks, IGA / AIM's logits / FastV's query rows are recomputed from q/k
by :mod:`vlmprune.signals.attention`; the choices are the pure functions of
:mod:`vlmprune.core.transprune`, :mod:`vlmprune.core.aim` and :mod:`vlmprune.core.fastv`.

Stages: ``(after_layer, counts)``: after ``after_layer`` decoder layers have run, image ``i`` keeps
``counts[i]`` of its visual tokens (absolute counts, from
:func:`vlmprune.core.schedule.stage_counts` on the ORIGINAL visual count); text is always kept.

Positions: ``reindex=True`` gives the remaining tokens 0..L'-1 after every stage (TransPrune on
LLaVA, as the paper); decoded tokens then continue from each layer's own length (one past its
largest id), so one new token has different position ids in layers before and after a stage (the
paper's decode shift).
``reindex=False`` keeps the original ids (Qwen M-RoPE, AIM, FastV as its official code); decoded
tokens continue from the largest original id + 1, the same id on all three M-RoPE axes and in
every layer.

Shapes: ``L`` sequence length (shrinks per stage), ``d`` hidden size, ``m`` appended tokens.
Batch size 1, as in both papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from vlmprune.backends.hf.base import Sequence
from vlmprune.core import aim, fastv, transprune
from vlmprune.reduction.stages import remap_rows as _remap
from vlmprune.reduction.stages import select_rows as _select
from vlmprune.reduction.stages import transprune_window
from vlmprune.reduction.ttv_capture import SubBlockCapture
from vlmprune.signals.attention import attention_logits, instruction_attention, query_attention

StageSpec = tuple[int, list[int]]


@dataclass
class ProgressiveState:
    """A prefilled, progressively pruned prompt plus its KV cache, ready to decode."""

    hidden: torch.Tensor
    """(L_final, d) final-norm hidden states of the kept prompt tokens, in sequence order."""
    decisions: list[torch.Tensor]
    """Per stage, (L_s,) ORIGINAL sequence indices kept from that stage on, ascending."""
    kept_per_layer: list[int]
    """Visual tokens (all images) in each decoder layer's input."""
    kept_index: torch.Tensor
    """(L_final,) original sequence index of each row of ``hidden``."""
    cache: DynamicCache
    text_model: Any
    reindex: bool
    next_positions: list[int]
    """Per layer, the position id the next appended token gets there: one past the largest id of
    that layer's sequence (its length when re-indexed; max original id + 1 otherwise)."""
    position_axes: int
    """0 for 1-D positions (L,), else the number of M-RoPE axes (3)."""

    def cache_lengths(self) -> list[int]:
        """Tokens held in each layer's KV cache."""
        return [self.cache.get_seq_length(i) for i in range(len(self.text_model.layers))]

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run ``m`` new tokens (m, d) through the pruned model with the cache; (m, d) normed states.

        Each layer gets the positions of its own (pruned) sequence: reindex continues from that
        layer's current length, original ids continue from the largest original id + 1 (the same
        id on every M-RoPE axis). ``m > 1`` uses an explicit causal mask over cache + new tokens.
        """
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden.shape[1]:
            raise ValueError(f"embeds must be (m, {self.hidden.shape[1]}), got {tuple(embeds.shape)}")
        m = embeds.shape[0]
        if m == 0:
            return embeds[:0]
        model = self.text_model
        impl = _attn_impl(model)
        hidden = embeds[None]  # (1, m, d)
        rope_by_start: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for idx, layer in enumerate(model.layers):
            past = self.cache.get_seq_length(idx)
            start = self.next_positions[idx]
            if start not in rope_by_start:
                pos = torch.arange(start, start + m, device=embeds.device)  # (m,)
                if self.position_axes:
                    pos = pos.unsqueeze(0).expand(self.position_axes, m)  # (3, m)
                rope_by_start[start] = _rotary(model, hidden, pos)
            mask = _causal_mask(impl, m, past + m, hidden.dtype, hidden.device)
            hidden = _call_layer(layer, hidden, mask, rope_by_start[start], self.cache)
        self.next_positions = [p + m for p in self.next_positions]
        return model.norm(hidden)[0]


def progressive_prefill(
    text_model: Any,
    seq: Sequence,
    visual_spans: list[torch.Tensor],
    stages: list[StageSpec],
    policy: Any,
    *,
    reindex: bool,
    accumulate_layers: tuple[int, int] | None = None,
) -> ProgressiveState:
    """Prefill ``seq`` through ``text_model`` one decoder layer at a time, pruning at each stage.

    ``visual_spans``: per image, (n_i,) ascending sequence indices of its visual tokens.
    ``stages``: ``(after_layer, counts)``, after_layer strictly increasing in [0, num_layers-1],
    per-image counts non-increasing. Scores at a stage after ``k`` layers:
    - TransPrune: per image, ``combine(TTV summed over the window so far, IGA)`` where IGA is
      the instruction rows' attention of layer ``k`` (the next one) on the current hidden states;
      the TTV sums travel with the kept tokens. No TTV yet (k = 0): IGA alone.
    - AIM: PageRank importance of layer ``k-1``'s full logits on its input (layer 0 for k = 0);
      only each image's visual tokens compete, so text is always kept.
    - FastV: the attention of layer ``k-1``'s query rows (the last prompt token, or the instruction
      rows with ``query="instruction"``) on its input, mean over heads (and rows); a stage at
      k = 0 scores with layer 0's own attention on the embeddings (FastV's schedule has none).
    ``policy``: a TransPrunePolicy (``direction``), an AIMPolicy (``pagerank_temperature``,
    ``pagerank_iterations``) or a FastVPolicy (``query``). ``accumulate_layers``: TransPrune's TTV
    window, inclusive 0-based layers; default :func:`transprune_window`.
    """
    method = getattr(policy, "method", None)
    if method not in ("transprune", "aim", "fastv"):
        raise ValueError(
            f"policy.method must be 'transprune', 'aim' or 'fastv' for progressive pruning, got {method!r}"
        )
    layers = text_model.layers
    n_layers = len(layers)
    _check_sequence(seq)
    _check_model(text_model)
    spans = [s.to(seq.embeds.device).long() for s in visual_spans]
    _check_spans(spans, seq.length)
    plan = _check_stages(stages, [int(s.numel()) for s in spans], n_layers)
    stage_at = dict(plan)
    if method == "transprune":
        window = accumulate_layers or transprune_window([layer for layer, _ in plan], n_layers)
    else:
        window = (0, -1)

    impl = _attn_impl(text_model)
    device = seq.embeds.device
    cache = DynamicCache(config=text_model.config)
    hidden = seq.embeds[None]  # (1, L, d)
    positions = seq.positions.to(device)  # (L,) or (3, L)
    orig = torch.arange(seq.length, device=device)  # (L,) original index of each row
    instr = seq.instruction_index.to(device).long()  # (t,) current row of each instruction token
    ttv_acc: torch.Tensor | None = None  # (L,) TTV summed over the window so far
    importance: torch.Tensor | None = None  # (L,) AIM importance / FastV scores of the pending stage
    rope = _rotary(text_model, hidden, positions)
    decisions: list[torch.Tensor] = []
    kept_per_layer: list[int] = []
    next_positions: list[int] = []

    for idx in range(n_layers):
        # 1. Stage after `idx` layers: score, keep, gather everything along the kept rows.
        if idx in stage_at:
            counts = stage_at[idx]
            if _prunes(counts, spans):
                with torch.no_grad():
                    if method == "transprune":
                        iga = instruction_attention(layers[idx], hidden[0], rope, instr)  # (L,)
                        chooser = _transprune_chooser(ttv_acc, iga)
                    elif method == "fastv":
                        if importance is None:  # stage at the LLM input: layer 0's own attention
                            importance = _fastv_scores(layers[0], hidden[0], rope, instr, policy)
                        chooser = _aim_chooser(importance, fastv.select)
                    else:
                        if importance is None:  # stage at the LLM input: layer 0's own logits
                            importance = _aim_importance(layers[0], hidden[0], rope, policy)
                        chooser = _aim_chooser(importance)
                keep, spans = _select(chooser, spans, counts, hidden.shape[1], device)
                instr = _remap(keep, instr)
                hidden, positions, orig = hidden[:, keep], positions[..., keep], orig[keep]
                ttv_acc = ttv_acc[keep] if ttv_acc is not None else None
            if reindex:  # every stage re-indexes, pruning or not, as forward_with_decisions does
                positions = _contiguous(positions)
            rope = _rotary(text_model, hidden, positions)
            decisions.append(orig.clone())
            importance = None

        # 2. AIM and FastV score a stage from the attention of the layer that precedes it.
        layer = layers[idx]
        if method in ("aim", "fastv") and _prunes(stage_at.get(idx + 1), spans):
            with torch.no_grad():
                if method == "aim":
                    importance = _aim_importance(layer, hidden[0], rope, policy)
                else:
                    importance = _fastv_scores(layer, hidden[0], rope, instr, policy)

        # 3. The layer itself (its own forward; TTV read from hooks inside the window).
        kept_per_layer.append(sum(int(s.numel()) for s in spans))
        next_positions.append(int(positions.max()) + 1 if positions.numel() else 0)
        mask = _causal_mask(impl, hidden.shape[1], hidden.shape[1], hidden.dtype, device)
        if window[0] <= idx <= window[1]:
            with SubBlockCapture(layer, batched=True) as cap:
                hidden = _call_layer(layer, hidden, mask, rope, cache)
            layer_ttv = cap.ttv(policy.direction)  # (L,)
            ttv_acc = layer_ttv if ttv_acc is None else ttv_acc + layer_ttv
        else:
            hidden = _call_layer(layer, hidden, mask, rope, cache)

    return ProgressiveState(
        hidden=text_model.norm(hidden)[0],
        decisions=decisions,
        kept_per_layer=kept_per_layer,
        kept_index=orig,
        cache=cache,
        text_model=text_model,
        reindex=reindex,
        next_positions=next_positions,
        position_axes=0 if seq.positions.ndim == 1 else int(seq.positions.shape[0]),
    )


def forward_with_decisions(
    text_model: Any,
    seq: Sequence,
    decisions: list[torch.Tensor],
    stages_layers: list[int],
    *,
    reindex: bool,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """The same pruned computation without a KV cache, applying given decisions; (L_final, d).

    ``decisions[i]`` (original indices kept after ``stages_layers[i]`` layers) refer to the first
    ``prompt_length`` tokens of ``seq`` (default: all); tokens after them (decoded tokens appended
    to the prompt) are always kept. Used to check that cached decoding is consistent.
    """
    _check_sequence(seq)
    _check_model(text_model)
    n_layers = len(text_model.layers)
    if len(decisions) != len(stages_layers):
        raise ValueError(f"decisions ({len(decisions)}) and stages_layers ({len(stages_layers)}) differ in length")
    if any(b <= a for a, b in zip(stages_layers, stages_layers[1:])) or any(
        not 0 <= s < n_layers for s in stages_layers
    ):
        raise ValueError(f"stages_layers must increase strictly within [0, {n_layers - 1}], got {stages_layers}")
    total = seq.length
    prompt_length = total if prompt_length is None else prompt_length
    if not 0 <= prompt_length <= total:
        raise ValueError(f"prompt_length must be in [0, {total}], got {prompt_length}")
    device = seq.embeds.device
    impl = _attn_impl(text_model)
    stage_at = dict(zip(stages_layers, decisions))
    hidden = seq.embeds[None]  # (1, L, d)
    positions = seq.positions.to(device)
    orig = torch.arange(total, device=device)
    rope = _rotary(text_model, hidden, positions)
    for idx, layer in enumerate(text_model.layers):
        if idx in stage_at:
            kept = stage_at[idx].to(device).long()
            if kept.numel() and int(kept.max()) >= prompt_length:
                raise ValueError(
                    f"decision at layer {idx} names index {int(kept.max())} >= prompt_length {prompt_length}"
                )
            member = torch.zeros(total, dtype=torch.bool, device=device)  # (L_total,)
            member[kept] = True
            member[prompt_length:] = True
            keep = member[orig].nonzero().squeeze(1)
            hidden, positions, orig = hidden[:, keep], positions[..., keep], orig[keep]
            if reindex:
                positions = _contiguous(positions)
            rope = _rotary(text_model, hidden, positions)
        mask = _causal_mask(impl, hidden.shape[1], hidden.shape[1], hidden.dtype, device)
        hidden = _call_layer(layer, hidden, mask, rope, None)
    return text_model.norm(hidden)[0]


# ---------------------------------------------------------------------------------------------
# Choosers: (image's visual rows (n,), count) -> kept local indices (count,), ascending.


def _transprune_chooser(ttv_acc: torch.Tensor | None, iga: torch.Tensor) -> Callable[[torch.Tensor, int], torch.Tensor]:
    def choose(rows: torch.Tensor, count: int) -> torch.Tensor:
        ttv = ttv_acc[rows] if ttv_acc is not None else None
        return transprune.reduce(transprune.combine(ttv, iga[rows]), count)

    return choose


def _aim_chooser(
    importance: torch.Tensor, pick: Callable[[torch.Tensor, int], torch.Tensor] = aim.prune
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    # Text is protected by construction: only each image's visual rows compete (AIM and FastV).
    def choose(rows: torch.Tensor, count: int) -> torch.Tensor:
        return pick(importance[rows], count)

    return choose


def _fastv_scores(layer, hidden: torch.Tensor, rope, instr: torch.Tensor, policy) -> torch.Tensor:
    """(L,) FastV scores: attention of ``layer``'s query rows (the last prompt token, or the
    instruction rows ``instr``) over every key of its input ``hidden``, mean over heads and rows."""
    rows = fastv.query_rows(getattr(policy, "query", "last"), hidden.shape[0], instr)
    return fastv.attention_scores(query_attention(layer, hidden, rope, rows))


def _aim_importance(layer, hidden: torch.Tensor, rope, policy) -> torch.Tensor:
    """(L,) PageRank importance from the full causal logits of ``layer`` on its input ``hidden``."""
    logits = attention_logits(layer, hidden, rope)  # (H, L, L)
    return aim.pagerank_importance(
        logits,
        temperature=getattr(policy, "pagerank_temperature", 0.1),
        iterations=getattr(policy, "pagerank_iterations", 5),
    )


def _prunes(counts: list[int] | None, spans: list[torch.Tensor]) -> bool:
    """Whether a stage removes any token (a stage that keeps every token needs no scores)."""
    return counts is not None and any(c < s.numel() for c, s in zip(counts, spans))


# ---------------------------------------------------------------------------------------------
# Layer plumbing.


def _call_layer(layer, hidden: torch.Tensor, mask, rope, cache) -> torch.Tensor:
    out = layer(
        hidden,
        attention_mask=mask,
        position_embeddings=rope,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    return out[0] if isinstance(out, tuple) else out


def _rotary(text_model, hidden: torch.Tensor, positions: torch.Tensor):
    """(cos, sin) for one sequence; M-RoPE positions (3, L) go in as (3, 1, L), 1-D as (1, L)."""
    pos = positions[None] if positions.ndim == 1 else positions[:, None]
    return text_model.rotary_emb(hidden, pos)


def _contiguous(positions: torch.Tensor) -> torch.Tensor:
    """0..L-1 on every axis (re-indexed positions after a stage)."""
    n = positions.shape[-1]
    ar = torch.arange(n, device=positions.device, dtype=positions.dtype)
    return ar if positions.ndim == 1 else ar.unsqueeze(0).expand(positions.shape[0], n).contiguous()


def _attn_impl(text_model) -> str:
    impl = getattr(text_model.config, "_attn_implementation", None) or "eager"
    if impl not in ("eager", "sdpa") and not impl.startswith("flash_attention"):
        raise ValueError(
            f"attention implementation {impl!r} is not supported by progressive pruning; use 'sdpa', 'eager' or flash"
        )
    return impl


def _causal_mask(impl: str, q_len: int, kv_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Additive (1, 1, q, kv) causal mask, query i at key position kv-q+i; None where the kernel's
    own causal flag is exact (one query; sdpa with q == kv; flash, whose causal mask is
    bottom-right aligned)."""
    if q_len == 1 or impl.startswith("flash_attention") or (impl == "sdpa" and q_len == kv_len):
        return None
    rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    allowed = torch.arange(kv_len, device=device)[None, :] <= rows  # (q, kv)
    mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


# ---------------------------------------------------------------------------------------------
# Validation of user input.


def _check_model(text_model) -> None:
    types = getattr(text_model.config, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise ValueError(f"progressive pruning supports full-attention layers only; config.layer_types = {types}")


def _check_sequence(seq: Sequence) -> None:
    length = seq.length
    if seq.embeds.ndim != 2:
        raise ValueError(f"seq.embeds must be (L, d), got {tuple(seq.embeds.shape)}")
    if seq.positions.shape[-1] != length or seq.positions.ndim not in (1, 2):
        raise ValueError(f"seq.positions must be ({length},) or (3, {length}), got {tuple(seq.positions.shape)}")


def _check_spans(spans: list[torch.Tensor], length: int) -> None:
    for i, s in enumerate(spans):
        if s.ndim != 1:
            raise ValueError(f"visual_spans[{i}] must be 1-D, got shape {tuple(s.shape)}")
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= length or bool((s[1:] <= s[:-1]).any())):
            raise ValueError(f"visual_spans[{i}] must be ascending sequence indices in [0, {length})")


def _check_stages(stages: list[StageSpec], sizes: list[int], n_layers: int) -> list[tuple[int, list[int]]]:
    plan = []
    previous_layer = -1
    previous = list(sizes)
    for i, (layer, counts) in enumerate(stages):
        layer = int(layer)
        counts = [int(c) for c in counts]
        if not previous_layer < layer < n_layers:
            raise ValueError(
                f"stages[{i}].after_layer must increase strictly within [0, {n_layers - 1}], got {layer}"
            )
        if len(counts) != len(sizes):
            raise ValueError(f"stages[{i}] has {len(counts)} counts for {len(sizes)} images")
        for img, (c, p) in enumerate(zip(counts, previous)):
            if not 0 <= c <= p:
                raise ValueError(f"stages[{i}] count for image {img} must be in [0, {p}] (non-increasing), got {c}")
        plan.append((layer, counts))
        previous_layer, previous = layer, counts
    return plan
