"""The in-LLM route's per-request plans and state, and its scheduler and runner hooks.

A request's :class:`RequestPlan` comes from its images' plans (:func:`vlmprune.reduction.plan.plan_image`
on the ``in_llm`` route) and its placeholders; :class:`RequestState` keeps its stages' decisions
across steps. The scheduler hook (:func:`mark_request`) keeps vLLM's chunked prefill and prefix
caching on for everyone else; the runner hooks (:func:`begin_batch`, :func:`end_batch`,
:func:`forget_requests`) tell the forward (:mod:`vlmprune.vllm_plugin.inllm`) which request each
batch row is. The hooks are installed by :mod:`vlmprune.vllm_plugin.patches`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlmprune.methods import policy_in_llm, route
from vlmprune.methods import names as method_names
from vlmprune.reduction.plan import plan_image, request_stages
from vlmprune.reduction.stages import instruction_start
from vlmprune.wire import policy_from_bytes

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


@dataclass
class BatchRow:
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
    """The request's block table row (reads the cached prefix's keys, :func:`cached_keys`)."""


MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl"})
"""Families whose positions are M-RoPE (3, T): kept rows keep their ids (no re-indexing)."""

STATES: dict[str, RequestState] = {}
BATCH: dict[str, Any] = {"runner": None, "req_ids": None}
_LOG: list[dict] | None = None


def start_log() -> bool:
    """Record every prefill's decisions (tests: ``llm.apply_model(lambda m: start_log())``)."""
    global _LOG
    _LOG = []
    return True


def prefill_log_on() -> bool:
    return _LOG is not None


def log_prefill(record: dict) -> None:
    """Append one prefill's decisions to the log when :func:`start_log` turned it on."""
    if _LOG is not None:
        _LOG.append(record)


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
        parts = [layout(f, BATCH["runner"]) for f in feats]
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
    BATCH.update(runner=runner, req_ids=list(runner.input_batch.req_ids[:n]))


def end_batch() -> None:
    BATCH.update(req_ids=None)


def forget_requests(request_ids: Any) -> None:
    """Drop the state of finished requests (``CPUModelRunner._update_states``)."""
    for rid in request_ids:
        STATES.pop(rid, None)


def metadata_builders(runner: Any) -> dict[str, Any]:
    cache = getattr(runner, "_vlmprune_builders", None)
    if cache is None:
        cache = {}
        for groups in runner.attn_groups:
            for group in groups:
                for name in group.layer_names:
                    cache[name] = group.get_metadata_builder()
        runner._vlmprune_builders = cache
    return cache
