"""In-LLM visual-token pruning inside vLLM's served LLM: TransPrune, AIM, FastV (and explain) between decoder layers.

What runs (the default route on every engine whose V1 model runner the plugin hooks, i.e. every CPU
engine; ``VLMPRUNE_ROUTE=probe`` opts out; LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL): the reference backend's progressive loop
(``vlmprune/backends/hf/progressive.py``) inside the served ``LlamaModel`` / ``Qwen2Model``.
Layers before a stage see every row; at a stage after ``k`` layers the kept visual rows of each
request are chosen from the signals of the layers just run, through the same functions the
reference uses (:mod:`vlmprune.core.transprune`, :mod:`vlmprune.core.aim`,
:func:`vlmprune.reduction.stages.select_rows`); later layers run on the kept rows only, in prefill
and in every decode step.

- ``transprune``: the placeholders keep every visual token (all enter layer 0); its stage at the
  LLM input (schedule stage 0) runs here *at layer 0* from layer 0's instruction attention on the
  embeddings (the reference's LLM-input reduction, same formula); later stages
  ``combine(TTV summed over transprune_window, IGA of layer k)``. The instruction is the prompt's
  own tokens after the last image (as the reference), not a policy field.
- ``aim``: ToMe merge before the LLM in ``embed_multimodal`` (placeholders = the schedule's
  LLM-input count, as today), then PageRank importance of layer ``k-1``'s full logits at each stage.
- ``fastv``: every visual token enters the LLM; after layer ``K`` the rows the last prompt token
  (or the instruction rows, ``query="instruction"``) attended to most in layer ``K-1`` stay
  (:mod:`vlmprune.core.fastv`), original positions.
- ``explain`` (not progressive): every visual token enters the LLM; its one choice runs *at layer
  0*, as TransPrune's input stage, with ``explain.reduce(cnn.relevance(layer 0's instruction
  attention at the image's prunable rows), image_kept_count(view_sizes, ratio))``: the reference's
  LLM-input reduction over the whole prompt (the shallow probe sees [image, instruction] only).
  The CNN comes from the model's :class:`~vlmprune.vllm_plugin.probe.ModelProbe` loader (the
  policy's ``checkpoint`` or the file shipped beside the model). Positions as the reference's:
  re-indexed on LLaVA, the original M-RoPE ids on Qwen.

Positions (FastV and AIM: original ids): TransPrune with ``positions="reindex"`` (the paper, the reference on LLaVA) gives the
kept rows ``0..L'-1`` after every stage and decoded tokens continue from each layer group's own
length: that is exactly a row's *compacted index* in its layer group, which is what is passed to
those layers' RoPE (applied inside each layer's attention). ``positions="original"`` and AIM keep
the original ids (gathered); decoded tokens keep the runner's position. Both match the reference.
Qwen (:data:`vlmprune.vllm_plugin.inllm_plan.MROPE_FAMILIES`): the runner's positions are (3, T) M-RoPE ids, sliced and gathered on
their last axis; kept rows always keep their (t, h, w) ids, whatever ``positions`` says (the
reference's Qwen adapters never re-index), and a decoded token gets the runner's
``L + step + mrope_position_delta`` = the prompt's largest id + 1 + step on every axis, which is the
reference's ``next_positions`` in every layer (the last prompt token, text, is never pruned and has
the largest id). Per-image counts come from each image's merged grid (AIM's placeholders are
already merged); the instruction starts after the last image's ``<|vision_end|>``, as the reference.

Mechanism (verified against ``../shared/design/spike_inllm_v1/``): per layer group, a shallow copy
of the forward context with attention metadata rebuilt by the layers' own metadata builder for the
shortened sequences (``seq_lens - pruned``, new ``query_start_loc``) and a compacted slot mapping
(kept rows written to the request's first ``seq_len - pruned`` slots of its own block table), under
``override_forward_context``; rows are scattered back before the LM head. Per-request state
(removed rows per stage) lives in this process keyed by request id, matched to the batch rows
through ``CPUModelRunner._model_forward`` (``input_batch.req_ids``, the row order of
``query_start_loc``); the policy comes from the request's multimodal fields
(``CachedRequestState.mm_features``), the image rows from their placeholder ranges.

Conditions (:func:`vlmprune.vllm_plugin.engine_checks.check_engine_in_llm`, refused at start with the flag named, or the probe route):
eager mode (``enforce_eager``), pipeline parallel size 1, the CPU platform's V1 runner (the only one
hooked), an unquantized KV cache. Tensor parallelism is served: each rank runs its heads, and the
stage scores are reduced across ranks (:mod:`.tensor_parallel`), so every rank keeps the same rows. vLLM's chunked prefill and prefix caching stay on
(:func:`vlmprune.vllm_plugin.inllm_plan.mark_request`, :mod:`.patches`): an in-LLM request's rows from its first image to the end of its
prompt are prefilled in one step (the rows before may come in earlier chunks: a stage then reads
their keys from the KV cache, :func:`vlmprune.vllm_plugin.inllm_scoring.cached_keys`, and its attention scores are the reference's over
the whole prompt); it never reads a prefix-cache hit (a hit would skip rows its stages must see, or
reuse another request's compacted rows), every other request keeps reading them. KV memory is not
saved (layers after a stage leave their tail slots unused); compute is.

LLaVA-NeXT: each image's prunable count follows its size and the stages choose among its prunable
rows only (newline rows always stay), as the reference (``request_plan``'s ``layout``, from
:mod:`vlmprune.vllm_plugin.llava_next`). Qwen: the layout gives each image's merged-grid count
(AIM's merged placeholders do not show it).

Refused per request by the processor (:func:`vlmprune.vllm_plugin.request_policy.check_in_llm_prompt`): a
video after the last image, TransPrune or explain with no instruction rows (explain: also missing CNN
weights, :func:`vlmprune.vllm_plugin.request_policy.check_probe`). Traced requests get each stage's
kept tokens added to their images' records (:func:`vlmprune.vllm_plugin.tracing.record_stages`).
Not done here: prompt logprobs of pruned rows (meaningless), speculative decoding.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any

import torch

from vlmprune.core import aim, explain, fastv, transprune
from vlmprune.reduction.stages import remap_rows, select_rows
from vlmprune.reduction.ttv_capture import SubBlockCapture
from vlmprune.vllm_plugin.fallback import evenly_spaced_choice, guarded_stage
from vlmprune.vllm_plugin.inllm_plan import (
    BATCH,
    STATES,
    BatchRow,
    RequestPlan,
    RequestState,
    first_image_row,
    log_prefill,
    metadata_builders,
    prefill_log_on,
    request_plan,
)
from vlmprune.vllm_plugin.inllm_scoring import (
    AttentionInputs,
    instruction_attention_scores,
    keep_key_weights,
    layer_scores,
    residual_stream,
    stage_scores,
)


# --- The forward ----------------------------------------------------------------------------------


class InLLMForward:
    """Replaces ``forward`` of a served LLaVA-1.5 / LLaVA-NeXT ``LlamaModel`` or Qwen2-VL / 2.5-VL
    ``Qwen2Model`` (set as an instance attribute)."""

    def __init__(
        self, lm: Any, family: str, n_prunable: int, layout: Any = None, *, vision_end: int | None = None,
        explain_model: Any = None,
    ) -> None:
        """``explain_model(policy, device)``: the explain policy's RelevanceCNN
        (:meth:`vlmprune.vllm_plugin.probe.ModelProbe.explain_model`, the probe route's loader)."""
        self.lm = lm
        self.explain_model = explain_model
        self.family = family
        self.n_prunable = n_prunable
        self.layout = layout  # request_plan's layout (LLaVA-NeXT, Qwen), None when every row is prunable
        self.vision_end = vision_end
        self.num_layers = len(lm.layers)
        self.stock = lm.forward

    def install(self) -> None:
        self.lm.forward = self
        for layer in self.lm.layers:
            keep_key_weights(layer.self_attn)


    # ---- which rows belong to which request, and what each must do
    def _rows(self, md: Any, positions: torch.Tensor) -> list[BatchRow] | None:
        runner, req_ids = BATCH["runner"], BATCH["req_ids"]
        if runner is None or req_ids is None:
            return None
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        if len(qsl) != len(req_ids) + 1:
            raise RuntimeError(f"vlmprune: the batch has {len(req_ids)} requests but {len(qsl) - 1} attention rows")
        out, active = [], False
        for r, rid in enumerate(req_ids):
            qs, qe = qsl[r], qsl[r + 1]
            ctx = seq_lens[r] - (qe - qs)
            row = BatchRow(rid, torch.arange(qs, qe, device=positions.device), positions[..., qs:qe], ctx)
            state = STATES.get(rid)
            req = runner.requests[rid]
            # A prefill step of the prompt that reaches its first image (a chunk of the rows before it
            # is stock rows; an image's layout may need its encoder output, which only the span's step has).
            if ctx < len(req.prompt_token_ids or []) and qe - qs + ctx > first_image_row(req.mm_features, default=ctx):
                plan = request_plan(req, self.family, self.n_prunable, self.num_layers, self.layout,
                                    vision_end=self.vision_end)
                if plan is not None and self._starts_span(rid, plan, ctx, qe - qs):
                    row.plan = plan
                    row.prefix = ctx
                    row.table = md.block_table[r]
                    row.replay = state.decisions if state is not None else None
                    row.spans = [(sp - ctx).to(positions.device) for sp in plan.spans]
                    row.instruction = (plan.instruction - ctx).to(positions.device)
                    row.prompt_index = torch.arange(ctx, qe - qs + ctx, device=positions.device)
                    row.state = RequestState([st for st, _ in plan.stages], [], reindex=plan.reindex)
                    active = True
            elif state is not None:
                row.state = state
                active = True
            out.append(row)
        return out if active else None

    @staticmethod
    def _starts_span(rid: str, plan: RequestPlan, ctx: int, length: int) -> bool:
        """Whether this prefill step of a planned request holds its span from the first image to the
        end of the prompt (then the stages run); False for a chunk of the rows before the first
        image (stock rows). Any other split breaks the scheduler hook's invariant."""
        first = plan.runs[0][0]
        if ctx <= first and ctx + length >= plan.prompt_len:
            return True
        if ctx + length <= first:
            return False
        raise RuntimeError(
            f"vlmprune: request {rid}'s prefill step covers prompt rows [{ctx}, {ctx + length}) of "
            f"{plan.prompt_len}, splitting the span from its first image (row {first}) to its end that an "
            "in-LLM stage needs whole (vlmprune's scheduler hook is not installed in the engine core, or a "
            "prefix-cache hit was read)"
        )

    # ---- the forward
    @torch.no_grad()
    def __call__(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **extra):
        from vllm.forward_context import get_forward_context, is_forward_context_available

        def stock():
            return self.stock(input_ids, positions, intermediate_tensors, inputs_embeds, **extra)

        if not is_forward_context_available():
            return stock()
        fc = get_forward_context()
        md_all = fc.attn_metadata
        names = [layer.self_attn.attn.layer_name for layer in self.lm.layers]
        if not isinstance(md_all, dict) or names[0] not in md_all:
            return stock()
        rows = self._rows(md_all[names[0]], positions)
        if rows is None:
            return stock()

        hidden = inputs_embeds if inputs_embeds is not None else self.lm.embed_input_ids(input_ids)
        num_tokens = hidden.shape[0]
        residual: torch.Tensor | None = None
        removed_ctx = [0] * len(rows)  # cached rows missing from the current layer group, per request
        group_fc, group_pos = None, positions
        offsets = self._offsets(rows)  # each request's first row in `hidden`; changes only at a stage taken
        for idx, layer in enumerate(self.lm.layers):
            # 1. Stages after `idx` layers: prefill rows choose their kept rows from the layout of
            #    the previous group; decode rows see a shorter cache from here on.
            choices: dict[int, torch.Tensor] = {}
            changed = False
            for r, row in enumerate(rows):
                if row.plan is not None:
                    counts = next((c for s, c in row.plan.stages if s == idx), None)
                    if counts is not None:
                        sl = slice(offsets[r], offsets[r] + int(row.rows.numel()))
                        choices[r] = self._choose(row, layer, counts, hidden, residual, sl, group_pos[..., sl])
                elif row.state is not None and row.state.removed_at(idx) != removed_ctx[r]:
                    removed_ctx[r] = row.state.removed_at(idx)
                    changed = True
            if choices:
                index = torch.cat([
                    offsets[r] + choices[r] if r in choices else torch.arange(offsets[r], offsets[r] + int(row.rows.numel()), device=hidden.device)
                    for r, row in enumerate(rows)
                ])
                hidden = hidden[index]
                residual = residual[index] if residual is not None else None
                for r, keep in choices.items():
                    self._apply(rows[r], keep)
                offsets = self._offsets(rows)
                changed = True  # every stage taken rebuilds the group (a no-op stage costs one rebuild)
            if changed:
                group_fc, group_pos = self._group_context(fc, rows, removed_ctx, names[idx:])
            # 2. AIM and FastV score a stage from the attention of the layer that precedes it: its
            #    own rotated q and k, read as they enter its attention (nothing projected twice).
            score_rows = []
            for r, row in enumerate(rows):
                if row.plan is None or row.plan.policy.method not in ("aim", "fastv") or row.replay is not None:
                    continue
                nxt = next((c for s, c in row.plan.stages if s == idx + 1), None)
                if nxt is not None and any(c < s.numel() for c, s in zip(nxt, row.spans)):
                    score_rows.append(r)
            # 3. The layer itself; TransPrune's TTV read from hooks inside its window.
            ttv_rows = [r for r, row in enumerate(rows) if row.plan is not None and row.replay is None
                        and row.plan.window[0] <= idx <= row.plan.window[1]]
            with override_context(group_fc) if group_fc is not None else nullcontext(), \
                    SubBlockCapture(layer) if ttv_rows else nullcontext() as cap, \
                    AttentionInputs(layer.self_attn.attn) if score_rows else nullcontext() as qk:
                hidden, residual = layer(group_pos, hidden, residual, **extra)
            for r in ttv_rows:
                row = rows[r]
                ttv = cap.ttv(row.plan.policy.direction, slice(offsets[r], offsets[r] + int(row.rows.numel())))
                row.ttv = ttv if row.ttv is None else row.ttv + ttv
            for r in score_rows:
                row = rows[r]
                q, k = qk.rows(slice(offsets[r], offsets[r] + int(row.rows.numel())), layer.self_attn.head_dim)
                row.importance = layer_scores(layer, q, k, row)
        hidden, _ = self.lm.norm(hidden, residual)
        self._finish(rows)
        out = hidden.new_zeros(num_tokens, hidden.shape[-1])
        out[torch.cat([row.rows for row in rows])] = hidden  # the runner's logits_indices stay valid
        return out

    @staticmethod
    def _offsets(rows: list[BatchRow]) -> list[int]:
        out, start = [], 0
        for row in rows:
            out.append(start)
            start += int(row.rows.numel())
        return out

    def _choose(self, row: BatchRow, layer, counts: list[int], hidden, residual, sl: slice, pos) -> torch.Tensor:
        """Local indices (ascending) of the rows request ``row`` keeps at this stage."""
        n = int(row.rows.numel())
        device = hidden.device
        s_index = len(row.state.decisions)
        if row.replay is not None:  # re-prefill after preemption: the first prefill's decisions
            kept = row.replay[s_index].to(device)
            member = torch.isin(row.prompt_index, kept) | (row.prompt_index >= row.plan.prompt_len)
            keep = member.nonzero().squeeze(1)
            row.spans = [torch.searchsorted(keep, s[torch.isin(s, keep)]) for s in row.spans]
            return keep
        if not any(c < s.numel() for c, s in zip(counts, row.spans)):
            row.importance = None
            return torch.arange(n, device=device)
        policy = row.plan.policy

        def scored():
            if policy.method == "transprune":
                iga = instruction_attention_scores(layer, residual_stream(hidden, residual, sl), pos, row)  # (n,)
                ttv_acc = row.ttv

                def choose(span_rows, count):
                    ttv = ttv_acc[span_rows] if ttv_acc is not None else None
                    return transprune.reduce(transprune.combine(ttv, iga[span_rows]), count)
            elif policy.method == "explain":  # at layer 0, over the image's prunable rows (the reference's input)
                if self.explain_model is None:
                    raise RuntimeError("vlmprune: method 'explain' reached the in-LLM stage without its RelevanceCNN")
                iga = instruction_attention_scores(layer, residual_stream(hidden, residual, sl), pos, row)  # (n,)
                cnn = self.explain_model(policy, iga.device)

                def choose(span_rows, count):
                    return explain.reduce(cnn.relevance(iga[span_rows].float()), count)
            else:  # AIM / FastV: scores of the layer before the stage (layer 0's own at the LLM input)
                importance = row.importance
                if importance is None:
                    importance = stage_scores(layer, residual_stream(hidden, residual, sl), pos, row)
                pick = fastv.select if policy.method == "fastv" else aim.prune

                def choose(span_rows, count):
                    return pick(importance[span_rows], count)

            return select_rows(choose, row.spans, counts, n, device)

        keep, row.spans = guarded_stage(row.rid, policy.method, s_index, scored,
                                        lambda: select_rows(evenly_spaced_choice, row.spans, counts, n, device))
        row.instruction = remap_rows(keep, row.instruction)
        row.importance = None
        return keep

    @staticmethod
    def _apply(row: BatchRow, keep: torch.Tensor) -> None:
        row.rows = row.rows[keep]
        row.positions = row.positions[..., keep]
        row.prompt_index = row.prompt_index[keep]
        if row.ttv is not None:
            row.ttv = row.ttv[keep]
        kept = row.prompt_index[row.prompt_index < row.plan.prompt_len]
        prefix = torch.arange(row.prefix, device=kept.device, dtype=kept.dtype)
        row.state.decisions.append(torch.cat([prefix, kept]))  # every prompt row kept, cached prefix included
        row.state.removed.append(row.plan.prompt_len - int(row.state.decisions[-1].numel()))

    def _group_context(self, fc, rows: list[BatchRow], removed_ctx: list[int], names: list[str]):
        """Forward context and positions of the layers ``names`` for the current rows."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        md_all = fc.attn_metadata
        device = rows[0].rows.device
        qlens = [int(row.rows.numel()) for row in rows]
        seqs = [row.ctx - removed_ctx[r] + qlens[r] for r, row in enumerate(rows)]
        compact = torch.cat([torch.arange(s - q, s, device=device) for s, q in zip(seqs, qlens)])  # (T',)
        owner = torch.cat([torch.full((q,), r, dtype=torch.long, device=device) for r, q in enumerate(qlens)])
        pos = torch.cat([  # (T',) or M-RoPE (3, T'): the rows' own ids, or re-indexed ones
            compact[o : o + q].expand_as(row.positions) if (row.state is not None and row.state.reindex) else row.positions
            for row, o, q in zip(rows, self._offsets(rows), qlens)
        ], dim=-1)
        i32 = md_all[names[0]].query_start_loc.dtype
        qsl = torch.zeros(len(rows) + 1, dtype=i32)
        qsl[1:] = torch.cumsum(torch.tensor(qlens, dtype=torch.int64), 0).to(i32)
        seq_t = torch.tensor(seqs, dtype=md_all[names[0]].seq_lens.dtype)
        new_md, new_slots, built = dict(md_all), dict(fc.slot_mapping), {}
        builders = metadata_builders(BATCH["runner"])
        for name in names:
            md = md_all[name]
            key = id(md)
            if key not in built:
                table = md.block_table
                size = fc.no_compile_layers[name].kv_cache.shape[2]  # [blocks, kv heads, block size, 2 * head]
                slot = (table[owner, compact // size].long() * size + compact % size).to(fc.slot_mapping[name].dtype)
                common = CommonAttentionMetadata(
                    query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_t, num_reqs=len(rows),
                    num_actual_tokens=int(sum(qlens)), max_query_len=max(qlens), max_seq_len=max(seqs),
                    block_table_tensor=table, slot_mapping=slot, causal=True,
                )
                built[key] = (builders[name].build(0, common), slot)
            new_md[name], new_slots[name] = built[key]
        group = copy.copy(fc)
        group.attn_metadata = new_md
        group.slot_mapping = new_slots
        return group, pos.to(rows[0].positions.dtype)

    @staticmethod
    def _finish(rows: list[BatchRow]) -> None:
        for row in rows:
            if row.plan is None:
                continue
            STATES[row.rid] = row.state
            if row.replay is None and prefill_log_on():
                log_prefill({
                    "req_id": row.rid, "method": row.plan.policy.method, "ratio": row.plan.policy.ratio,
                    "stages": list(row.state.stage_layers),
                    "decisions": [d.tolist() for d in row.state.decisions],
                    "spans": [s.tolist() for s in row.plan.spans],  # prunable rows per image
                    "runs": [[int(s[0]), int(s[1])] for s in row.plan.runs],  # placeholder (offset, length)
                })
            if row.replay is None and any(row.plan.traces):
                _trace_stages(row.plan, row.state)


def _trace_stages(plan: RequestPlan, state: RequestState) -> None:
    """Each traced image's kept rows after every stage, as positions among its prunable rows."""
    from vlmprune.vllm_plugin.tracing import record_stages

    for span, trace in zip(plan.spans, plan.traces):
        if trace is not None:
            span = span.to(state.decisions[0].device) if state.decisions else span
            stages = [(layer, torch.isin(span, kept).nonzero().flatten().tolist())
                      for layer, kept in zip(state.stage_layers, state.decisions)]
            record_stages(trace, stages)


def override_context(fc):
    from vllm.forward_context import override_forward_context

    return override_forward_context(fc)
