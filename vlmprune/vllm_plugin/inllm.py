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
Qwen (:data:`MROPE_FAMILIES`): the runner's positions are (3, T) M-RoPE ids, sliced and gathered on
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

Conditions (:func:`check_engine_in_llm`, refused at start with the flag named, or the probe route):
eager mode (``enforce_eager``), pipeline parallel size 1, the CPU platform's V1 runner (the only one
hooked), an unquantized KV cache. Tensor parallelism is served: each rank runs its heads, and the
stage scores are reduced across ranks (:mod:`.tensor_parallel`), so every rank keeps the same rows. vLLM's chunked prefill and prefix caching stay on
(:func:`mark_request`, :mod:`.patches`): an in-LLM request's rows from its first image to the end of its
prompt are prefilled in one step (the rows before may come in earlier chunks: a stage then reads
their keys from the KV cache, :func:`_cached_keys`, and its attention scores are the reference's over
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
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmprune.core import aim, explain, fastv, transprune
from vlmprune.methods import ROUTE_ENV, policy_in_llm, route
from vlmprune.methods import names as method_names
from vlmprune.reduction.plan import plan_image, request_stages
from vlmprune.reduction.stages import instruction_start, remap_rows, select_rows
from vlmprune.reduction.ttv_capture import SubBlockCapture
from vlmprune.signals.attention import attention_rows
from vlmprune.vllm_plugin.fallback import evenly_spaced_choice, guarded_stage
from vlmprune.vllm_plugin.tensor_parallel import attention_shards, gather_heads, mean_over_shards
from vlmprune.wire import policy_from_bytes


def check_engine_in_llm(vllm_config: Any, model_name: str) -> None:
    """Refuse to start an engine on the in-LLM route whose settings would give wrong answers; the
    message names the flag, or the probe route. Chunked prefill and prefix caching stay on
    (:func:`mark_request`, :mod:`.patches`)."""
    if route() != "in_llm":
        return
    from vllm.platforms import current_platform

    problems = []
    if not current_platform.is_cpu():
        problems.append("only vLLM's CPU V1 model runner is hooked (run on the CPU platform)")
    if not vllm_config.model_config.enforce_eager:
        problems.append("CUDA graphs / torch.compile cannot run a data-dependent gather: pass --enforce-eager")
    if int(vllm_config.parallel_config.pipeline_parallel_size) > 1:
        problems.append("a stage needs every decoder layer on one rank: pipeline parallel size must be 1")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append("a stage reads the keys of earlier prefill chunks from the KV cache: use --kv-cache-dtype auto")
    if problems:
        raise RuntimeError(
            f"vlmprune: the in-LLM route ({ROUTE_ENV}=in_llm, the default for transprune/aim/fastv/explain) cannot serve "
            f"{model_name}: " + "; ".join(problems) + f". Or serve them at the LLM input: {ROUTE_ENV}=probe"
        )


# --- Per-request plans and state ----------------------------------------------------------------


@dataclass
class RequestPlan:
    """What one request's prefill must do: its policy, stages and prompt rows."""

    policy: Any
    stages: list[tuple[int, list[int]]]
    """``(after_layer, kept visual rows per image)``, after_layer ascending."""
    spans: list[torch.Tensor]
    """Per image, (n_i,) prompt rows of its visual tokens (the placeholder run)."""
    instruction: torch.Tensor
    """(t,) prompt rows after the last image (the reference's instruction)."""
    reindex: bool
    window: tuple[int, int]
    """TransPrune's TTV layers (inclusive; empty for AIM)."""
    prompt_len: int
    runs: list[tuple[int, int]] = field(default_factory=list)
    """Per image, (offset, length) of its whole placeholder run (LLaVA-NeXT: newline rows included)."""
    traces: list[tuple[str, int] | None] = field(default_factory=list)
    """Per image, its kept-token trace (id, image index) when the request asked for one."""


@dataclass
class RequestState:
    """Kept across steps for a prefilled request."""

    stage_layers: list[int]
    removed: list[int]
    """Prompt rows removed by the end of each stage (cumulative)."""
    decisions: list[torch.Tensor] = field(default_factory=list)
    """Per stage, (L_s,) prompt rows kept, ascending (a re-prefill after preemption replays them)."""
    reindex: bool = False

    def removed_at(self, layer: int) -> int:
        """Rows of the prompt missing from layer ``layer``'s KV cache."""
        out = 0
        for stage_layer, removed in zip(self.stage_layers, self.removed):
            if stage_layer <= layer:
                out = removed
        return out


MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})
"""Families whose positions are M-RoPE (3, T): kept rows keep their ids (no re-indexing)."""

STATES: dict[str, RequestState] = {}
_BATCH: dict[str, Any] = {"runner": None, "req_ids": None}
_LOG: list[dict] | None = None


def start_log() -> bool:
    """Record every prefill's decisions (tests: ``llm.apply_model(lambda m: start_log())``)."""
    global _LOG
    _LOG = []
    return True


def read_log() -> list[dict]:
    """The records since the last read; the read empties the log."""
    out = list(_LOG or [])
    if _LOG is not None:
        _LOG.clear()
    return out


def feature_policy(mm_features: Any) -> Any | None:
    """The policy a request's images carry (vLLM's ``mm_features``, scheduler or runner side);
    None when an image has none or the images disagree."""
    from vlmprune.vllm_plugin.fields import FIELD_POLICY, field_bytes

    feats = [f for f in (mm_features or []) if f.modality == "image"]
    raws = set()
    for f in feats:
        if f.data is None or FIELD_POLICY not in f.data:
            return None
        raws.add(field_bytes(f.data[FIELD_POLICY].data))
    if len(raws) != 1 or not next(iter(raws)):
        return None
    return policy_from_bytes(next(iter(raws)))


def first_image_row(mm_features: Any, default: int = 0) -> int:
    """The prompt row of a request's first image placeholder (``default`` when it has no image)."""
    return min((int(f.mm_position.offset) for f in mm_features or [] if f.modality == "image"), default=default)


def request_plan(
    req_state: Any, family: str, n_prunable: int, num_layers: int, layout: Any = None, *, vision_end: int | None = None
) -> RequestPlan | None:
    """The plan of a request from its multimodal fields and placeholders (None: nothing in-LLM).

    ``layout``: for images whose placeholder run is not ``n_prunable`` prunable rows (LLaVA-NeXT:
    newline rows and a prunable count that depends on the image size; Qwen: the merged grid, which
    AIM's merged placeholders do not show), ``layout(feature, runner) -> (n_prunable or its counts per
    view, (run,) bool prunable rows)`` (LLaVA-NeXT gives per-view counts: explain budgets each view);
    None: every row is prunable and each image has ``n_prunable``.
    ``vision_end``: a token id that closes an image run and is not instruction (Qwen's
    ``<|vision_end|>``, which the reference skips too)."""
    policy = feature_policy(req_state.mm_features)
    if not policy_in_llm(policy, family):
        return None
    feats = sorted((f for f in req_state.mm_features if f.modality == "image"), key=lambda f: f.mm_position.offset)
    runs = [torch.arange(f.mm_position.offset, f.mm_position.offset + f.mm_position.length) for f in feats]
    if layout is None:
        sizes, spans = [n_prunable] * len(feats), runs
    else:  # the reference's spans: each image's prunable rows only (newlines are always kept)
        parts = [layout(f, _BATCH["runner"]) for f in feats]
        sizes = [n for n, _ in parts]  # LLaVA-NeXT: per view (explain budgets each view)
        spans = [run[mask] for run, (_, mask) in zip(runs, parts)]
    plans = [plan_image(policy, family, n, num_layers, route="in_llm") for n in sizes]
    stages = request_stages(plans)
    if not stages:
        return None
    window = next((plan.window for plan in plans if plan.window != (0, -1)), (0, -1))  # same layers for all
    for f in feats:
        if f.mm_position.is_embed is not None and not bool(f.mm_position.is_embed.all()):
            raise RuntimeError("vlmprune: in-LLM pruning expects every placeholder row to be an image row")
    prompt_len = len(req_state.prompt_token_ids)
    instruction = torch.arange(instruction_start(req_state.prompt_token_ids, int(runs[-1][-1]) + 1, vision_end), prompt_len)
    if policy.method in ("transprune", "explain") and instruction.numel() == 0:
        raise RuntimeError(f"vlmprune: {policy.method} needs instruction text after the last image, and the prompt has none")
    # M-RoPE families keep the original (t, h, w) ids whatever ``positions`` says, as the
    # reference's Qwen adapters (``reindex_after_pruning = False``); explain's reference re-indexes
    # its pruned LLaVA input as TransPrune's default does.
    reindex = family not in MROPE_FAMILIES and (
        (policy.method == "transprune" and policy.positions == "reindex") or policy.method == "explain")
    from vlmprune.vllm_plugin.fields import FIELD_TRACE, _trace_of

    traces = [_trace_of(f.data[FIELD_TRACE].data) if FIELD_TRACE in f.data else None for f in feats]
    return RequestPlan(policy, stages, spans, instruction, reindex, window, prompt_len,
                       [(f.mm_position.offset, f.mm_position.length) for f in feats], traces)


# --- Scheduler hook: prefix caching stays on for everyone ------------------------------------------


def mark_request(request: Any) -> None:
    """Engine core, as a request arrives (``Scheduler.add_request``, :mod:`.patches`); acts only on
    the in-LLM route (one process may run engines of both routes). A request served in-LLM never
    *reads* prefix-cache hits (vLLM's
    per-request ``Request.skip_reading_prefix_cache``, the switch prompt-logprob requests use), so
    its stages always see the whole prompt; it is marked with the row of its first image.

    Then, in ``Scheduler._try_schedule_encoder_inputs`` (called with the step's token count on the
    running and the waiting path, before slots are allocated): chunked prefill stays on, but a step of a
    marked request that would end inside the span from its first image to the end of its prompt is
    rolled back to before the image (:func:`in_llm_step`), as vLLM's own ``disable_chunked_mm_input``
    rolls back to before an item; the span is then prefilled in one later step, with a stage's
    whole input. vLLM itself may cut a step before an image it cannot encode then (the step's encoder
    budget spent by other requests): such a cut inside the span is rolled back the same way, so all
    of the span's images are encoded in one step. The rows before the first image may come in
    earlier chunks (stock rows, which no stage removes). The processor refuses spans longer than the step budget
    (:func:`vlmprune.vllm_plugin.request_policy.check_in_llm_prompt`), so every marked request is scheduled.

    Why prefix caching can stay on for every other request: a block's hash chains every block
    before it and each image's hash includes its ``mm_processor_kwargs`` (the policy), so a block
    from the first image of an in-LLM request on can only match a request with the same policy,
    image and prefix, which is in-LLM too and does not read. Blocks wholly before the first image
    hold rows no stage removes, at unchanged slots and positions: stock KV, safe to share both ways."""
    policy = feature_policy(request.mm_features) if route() == "in_llm" else None
    if policy is not None and policy.ratio > 0.0 and policy.method in _IN_LLM_METHODS:
        request.skip_reading_prefix_cache = True
        request.vlmprune_span_start = first_image_row(request.mm_features)


_IN_LLM_METHODS = method_names("in_llm")


def in_llm_step(span_start: int, prompt_len: int, computed: int, new: int) -> int:
    """Tokens an in-LLM request may prefill in a step that offers ``new`` after ``computed``: all of
    them, unless the step would end inside ``[span_start, prompt_len)`` having started at or before
    ``span_start``; then only the rows before the span (0: it waits for a step that holds the span)."""
    end = computed + new
    if computed > span_start or end >= prompt_len or end <= span_start:
        return new
    return span_start - computed


# --- Runner hooks --------------------------------------------------------------------------------


def begin_batch(runner: Any) -> None:
    """Worker, before the model's forward (``CPUModelRunner._model_forward``, :mod:`.patches`): the
    batch's rows -> request ids, for :class:`InLLMForward`."""
    n = runner.input_batch.num_reqs
    _BATCH.update(runner=runner, req_ids=list(runner.input_batch.req_ids[:n]))


def end_batch() -> None:
    _BATCH.update(req_ids=None)


def forget_requests(request_ids: Any) -> None:
    """Drop the state of finished requests (``CPUModelRunner._update_states``)."""
    for rid in request_ids:
        STATES.pop(rid, None)


def _builders(runner: Any) -> dict[str, Any]:
    cache = getattr(runner, "_vlmprune_builders", None)
    if cache is None:
        cache = {}
        for groups in runner.attn_groups:
            for group in groups:
                for name in group.layer_names:
                    cache[name] = group.get_metadata_builder()
        runner._vlmprune_builders = cache
    return cache


# --- The forward ----------------------------------------------------------------------------------


@dataclass
class _Row:
    """One request of the batch inside one forward."""

    rid: str
    rows: torch.Tensor
    """(n,) rows of the step's input this request still has, ascending."""
    positions: torch.Tensor
    """(n,) or M-RoPE (3, n): the runner's positions of those rows (original ids)."""
    ctx: int
    """Tokens already in the cache before this step (full view)."""
    plan: RequestPlan | None = None
    state: RequestState | None = None
    spans: list[torch.Tensor] = field(default_factory=list)
    """Per image, its visual rows among this request's current rows (prefill)."""
    instruction: torch.Tensor | None = None
    ttv: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    replay: list[torch.Tensor] | None = None
    prompt_index: torch.Tensor | None = None
    """(n,) index in the request's own sequence of each current row (prefill)."""
    prefix: int = 0
    """Prompt rows before this step, cached by earlier chunks (all before the first image)."""
    table: torch.Tensor | None = None
    """The request's block table row (reads the cached prefix's keys, :func:`_cached_keys`)."""


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
            _keep_key_weights(layer.self_attn)


    # ---- which rows belong to which request, and what each must do
    def _rows(self, md: Any, positions: torch.Tensor) -> list[_Row] | None:
        runner, req_ids = _BATCH["runner"], _BATCH["req_ids"]
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
            row = _Row(rid, torch.arange(qs, qe, device=positions.device), positions[..., qs:qe], ctx)
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
        for idx, layer in enumerate(self.lm.layers):
            # 1. Stages after `idx` layers: prefill rows choose their kept rows from the layout of
            #    the previous group; decode rows see a shorter cache from here on.
            offsets = self._offsets(rows)
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
                changed = True  # every stage taken rebuilds the group (a no-op stage costs one rebuild)
            if changed:
                group_fc, group_pos = self._group_context(fc, rows, removed_ctx, names[idx:])
            # 2. AIM and FastV score a stage from the attention of the layer that precedes it.
            offsets = self._offsets(rows)
            for r, row in enumerate(rows):
                if row.plan is None or row.plan.policy.method not in ("aim", "fastv") or row.replay is not None:
                    continue
                nxt = next((c for s, c in row.plan.stages if s == idx + 1), None)
                if nxt is not None and any(c < s.numel() for c, s in zip(nxt, row.spans)):
                    sl = slice(offsets[r], offsets[r] + int(row.rows.numel()))
                    row.importance = _scores(layer, _stream(hidden, residual, sl), group_pos[..., sl], row)
            # 3. The layer itself; TransPrune's TTV read from hooks inside its window.
            ttv_rows = [r for r, row in enumerate(rows) if row.plan is not None and row.replay is None
                        and row.plan.window[0] <= idx <= row.plan.window[1]]
            with override_context(group_fc) if group_fc is not None else nullcontext():
                if ttv_rows:
                    with SubBlockCapture(layer) as cap:
                        hidden, residual = layer(group_pos, hidden, residual, **extra)
                    for r in ttv_rows:
                        row = rows[r]
                        ttv = cap.ttv(row.plan.policy.direction, slice(offsets[r], offsets[r] + int(row.rows.numel())))
                        row.ttv = ttv if row.ttv is None else row.ttv + ttv
                else:
                    hidden, residual = layer(group_pos, hidden, residual, **extra)
        hidden, _ = self.lm.norm(hidden, residual)
        self._finish(rows)
        out = hidden.new_zeros(num_tokens, hidden.shape[-1])
        out[torch.cat([row.rows for row in rows])] = hidden  # the runner's logits_indices stay valid
        return out

    @staticmethod
    def _offsets(rows: list[_Row]) -> list[int]:
        out, start = [], 0
        for row in rows:
            out.append(start)
            start += int(row.rows.numel())
        return out

    def _choose(self, row: _Row, layer, counts: list[int], hidden, residual, sl: slice, pos) -> torch.Tensor:
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
        h = _stream(hidden, residual, sl)
        policy = row.plan.policy

        def scored():
            if policy.method == "transprune":
                iga = _instruction_attention(layer, h, pos, row)  # (n,)
                ttv_acc = row.ttv

                def choose(span_rows, count):
                    ttv = ttv_acc[span_rows] if ttv_acc is not None else None
                    return transprune.reduce(transprune.combine(ttv, iga[span_rows]), count)
            elif policy.method == "explain":  # at layer 0, over the image's prunable rows (the reference's input)
                if self.explain_model is None:
                    raise RuntimeError("vlmprune: method 'explain' reached the in-LLM stage without its RelevanceCNN")
                iga = _instruction_attention(layer, h, pos, row)  # (n,)
                cnn = self.explain_model(policy, iga.device)

                def choose(span_rows, count):
                    return explain.reduce(cnn.relevance(iga[span_rows].float()), count)
            else:  # AIM / FastV: scores of the layer before the stage (layer 0's own at the LLM input)
                importance = row.importance if row.importance is not None else _scores(layer, h, pos, row)
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
    def _apply(row: _Row, keep: torch.Tensor) -> None:
        row.rows = row.rows[keep]
        row.positions = row.positions[..., keep]
        row.prompt_index = row.prompt_index[keep]
        if row.ttv is not None:
            row.ttv = row.ttv[keep]
        kept = row.prompt_index[row.prompt_index < row.plan.prompt_len]
        prefix = torch.arange(row.prefix, device=kept.device, dtype=kept.dtype)
        row.state.decisions.append(torch.cat([prefix, kept]))  # every prompt row kept, cached prefix included
        row.state.removed.append(row.plan.prompt_len - int(row.state.decisions[-1].numel()))

    def _group_context(self, fc, rows: list[_Row], removed_ctx: list[int], names: list[str]):
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
        builders = _builders(_BATCH["runner"])
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
    def _finish(rows: list[_Row]) -> None:
        for row in rows:
            if row.plan is None:
                continue
            STATES[row.rid] = row.state
            if _LOG is not None and row.replay is None:
                _LOG.append({
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


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None, sl: slice) -> torch.Tensor:
    """(n, d) the residual stream (a layer's input) of one request's current rows."""
    return hidden[sl] if residual is None else hidden[sl] + residual[sl]


def _keep_key_weights(attn) -> None:
    """Keep a copy of the key rows of ``attn``'s fused q/k/v projection (and bias) as
    ``attn.vlmprune_key_proj``, taken when vLLM post-processes the loaded weights: on CPU it then packs
    them for oneDNN and drops the plain weight. A stage scores with the keys of every row but the
    queries of a few (TransPrune: the instruction rows; FastV: the last row), so it projects the keys
    alone (:func:`_qk`) instead of q, k and v of every row. Memory: the k projection of every layer
    (``kv heads x head dim x hidden`` weights each; a quarter of q/k/v at half as many KV as query heads)."""
    proj = attn.qkv_proj
    method = proj.quant_method
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer) -> None:
        if layer is proj and proj.weight.ndim == 2 and proj.weight.shape[0] == attn.q_size + 2 * attn.kv_size:
            rows = slice(attn.q_size, attn.q_size + attn.kv_size)
            bias = getattr(proj, "bias", None)
            attn.vlmprune_key_proj = (proj.weight[rows].detach().clone(),
                                      bias[rows].detach().clone() if bias is not None else None)
        original(layer)

    method.process_weights_after_loading = process_weights_after_loading


def _qk(layer, h: torch.Tensor, pos: torch.Tensor, row: _Row,
        q_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (t, H, D) of ``q_rows`` among one request's current rows in ``layer`` (None: every row) and
    k (prefix + n, Hkv, D): the keys of its prompt rows cached by earlier prefill chunks
    (:func:`_cached_keys`), then the current rows'. With ``q_rows`` and the layer's key projection
    kept (:func:`_keep_key_weights`), only the keys of every row and the queries of ``q_rows`` are
    projected; otherwise q/k/v of every row (:func:`vlmprune.vllm_plugin.probe.decoder_qkv`)."""
    from vlmprune.vllm_plugin.probe import decoder_qkv

    attn = layer.self_attn
    normed = layer.input_layernorm(h)
    key_proj = getattr(attn, "vlmprune_key_proj", None)
    if q_rows is None or key_proj is None or getattr(attn, "q_norm", None) is not None:
        q, k, _ = decoder_qkv(attn, normed, pos)
        q = q if q_rows is None else q[q_rows]
    else:
        d = attn.head_dim
        k = torch.nn.functional.linear(normed, *key_proj)  # (n, Hkv * D)
        qkv, _ = attn.qkv_proj(normed[q_rows])
        q = qkv[:, : attn.q_size].contiguous()
        # vLLM's rotary kernels rotate a query and a key (in place): a throwaway partner for each.
        q, _ = attn.rotary_emb(pos[..., q_rows], q, torch.zeros(q.shape[0], attn.kv_size, dtype=q.dtype))
        _, k = attn.rotary_emb(pos, k.clone(), k)
        q, k = q.view(q.shape[0], -1, d), k.view(k.shape[0], -1, d)
    if row.prefix:
        k = torch.cat([_cached_keys(layer, row.table, row.prefix).to(k.dtype), k])
    return q, k


def _cached_keys(layer, table: torch.Tensor, n: int) -> torch.Tensor:
    """(n, Hkv, D) the keys of a request's first ``n`` rows in ``layer``'s KV cache: rows before any
    stage, so at slots ``0..n-1`` of its block table in every layer. The CPU backend's layout
    (``cpu_attn.py``): ``[blocks, kv heads, block size, 2 * head]``, keys in the first half of each
    block's rows once viewed as ``[blocks, kv heads, 2 * block size, head]``."""
    cache = layer.self_attn.attn.kv_cache
    blocks, heads, size, width = cache.shape
    j = torch.arange(n, device=cache.device)
    view = cache.view(blocks, heads, 2 * size, width // 2)
    return view[table[j // size].long().to(cache.device), :, j % size, :]


def _scores(layer, h: torch.Tensor, pos: torch.Tensor, row: _Row) -> torch.Tensor:
    """(n,) AIM's PageRank importance or FastV's attention received from its query rows."""
    policy = row.plan.policy
    if policy.method == "aim":  # PageRank of the full causal logits (H, n, prefix + n)
        q, k = _qk(layer, h, pos, row)
        from vlmprune.vllm_plugin.probe import causal_logits

        logits = gather_heads(causal_logits(q, k), attention_shards(layer.self_attn), dim=0)  # every head, in order
        return aim.pagerank_importance(
            logits, temperature=policy.pagerank_temperature, iterations=policy.pagerank_iterations
        )
    rows = fastv.query_rows(policy.query, h.shape[0], row.instruction).to(h.device)
    q, k = _qk(layer, h, pos, row, rows)
    probs = attention_rows(q, k, rows + row.prefix)  # (H, t, prefix + n)
    return mean_over_shards(fastv.attention_scores(probs[..., row.prefix :]), attention_shards(layer.self_attn))  # (n,)


def override_context(fc):
    from vllm.forward_context import override_forward_context

    return override_forward_context(fc)


def _instruction_attention(layer, h: torch.Tensor, pos: torch.Tensor, row: _Row) -> torch.Tensor:
    """(n,) the instruction rows' attention over every row of one request, mean over heads and rows
    (:func:`vlmprune.signals.attention.instruction_attention` on vLLM's fused q/k projection)."""
    q, k = _qk(layer, h, pos, row, row.instruction)
    probs = attention_rows(q, k, row.instruction + row.prefix)  # (H, t, prefix + n)
    return mean_over_shards(probs[..., row.prefix :].mean(dim=(0, 1)), attention_shards(layer.self_attn))
