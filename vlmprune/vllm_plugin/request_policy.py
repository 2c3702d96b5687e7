"""A request's policy in the engine: the methods this plugin runs, the merge over the engine default,
and the checks that refuse a request in the processor (a 400; the engine keeps serving).

How a policy travels (vLLM 0.32, see ``../shared/design/VLLM_INTEGRATION.md`` §2, §3, §10):

1. The request carries ``mm_processor_kwargs={"vlmprune": {"method": ..., "ratio": ..., ...}}``;
   an engine-wide default comes from vLLM's own ``--mm-processor-kwargs '{"vlmprune": {...}}'``.
   vLLM merges the request over the default with ``MultiModalConfig.merge_mm_processor_kwargs``,
   which merges nested mappings *recursively*: a request's ``{"vlmprune": {"ratio": 0.9}}`` keeps
   the default's method and options and replaces only the ratio; ``{"vlmprune": None}`` turns
   pruning off for that request. (Consequence: a request cannot drop an option of the default's
   method; switching to a method that lacks that option is rejected as an unknown option.)
2. The multimodal processor (front end) validates the merged policy with
   :func:`vlmprune.wire.parse_request` (once per distinct value), checks the method against the model
   (:func:`check_method`), computes each image's plan (:func:`vlmprune.reduction.plan.plan_image`:
   its placeholders are the only count the scheduler and the model ever use) and attaches per-image
   tensor fields (:func:`vlmprune.vllm_plugin.fields.encode_fields`): the policy as JSON bytes
   (:func:`vlmprune.wire.policy_bytes`), the count, and the instruction ids.
   The fields are ``MultiModalFieldConfig.batched("image")``; the request's
   ``mm_processor_kwargs`` are part of the multimodal hash, so processor, encoder and prefix
   caches never mix ratios.
3. The plugin's key never reaches the Hugging Face processor:
   :class:`vlmprune.vllm_plugin.processor.PolicyFreeContext` drops it
   from every merge vLLM does on the processor's behalf, and the processors pop it as well.
4. The model (worker) pops the fields in ``embed_multimodal``
   (:func:`vlmprune.vllm_plugin.fields.pop_item_policies`), decides
   with :mod:`vlmprune.core` (through :func:`vlmprune.reduction.reduce.reduce_image`, the same
   routing the transformers backend uses) and returns exactly ``count`` rows per image.

On the probe route (``VLMPRUNE_ROUTE=probe``, engines the plugin does not hook), the instruction-aware
methods (``transprune``, ``explain``, AIM's prune stage; ``PROBE_METHODS``) need
the request's instruction: pass it as ``{"vlmprune": {..., "instruction": "what colour ..."}}`` (the
gateway fills it from the chat). It is tokenized in the processor (:func:`instruction_ids`), travels
as the per-image field ``vlmprune_instruction_ids`` and feeds the shallow probe of
:mod:`vlmprune.vllm_plugin.probe` in ``embed_multimodal``. :func:`check_probe` rejects, in the
processor (so the request fails and the engine keeps serving), an active probe policy without an
instruction, a ``probe_layers`` deeper than the model, and an explain policy whose CNN weights are
missing.

Engine default vs request (:func:`merged_request`): vLLM merges the request's ``vlmprune`` mapping over
the default's recursively. When the request names a *different* method than the default, the
default's options that the request's method does not have are dropped first (its ``ratio`` is kept
unless the request gives one), so ``--mm-processor-kwargs '{"vlmprune": {"method": "aim",
"merge_keep": 0.3}}'`` does not break a request for ``transprune``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from vlmprune.methods import ROUTE_ENV, names, policy_in_llm, require_support, served_in_llm
from vlmprune.policy import PolicyError
from vlmprune.reduction.stages import instruction_start
from vlmprune.wire import INSTRUCTION_KEY, POLICY_KEY, RequestPolicy, parse_request

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
        if policy.method == "explain":  # ... and explain's CNN, whichever route scores with it
            load_explain_model(explain_checkpoint(policy, model_dir))
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
    TransPrune and explain need at least one such row. The rows from the first image to the end of the prompt
    are prefilled in one engine step (:func:`vlmprune.vllm_plugin.inllm_plan.mark_request`),
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
    if policy.method in ("transprune", "explain") and instruction_start(prompt_ids, after_images, vision_end) >= len(prompt_ids):
        raise PolicyError(
            f"method {policy.method!r} (in-LLM) needs instruction text after the last image, and the prompt has none"
        )


def instruction_ids(tokenizer: Any, request: RequestPolicy) -> list[int]:
    """The instruction's token ids without special tokens ([] when none was given)."""
    if not request.instruction:
        return []
    return list(tokenizer.encode(request.instruction, add_special_tokens=False))


def without_policy(kwargs: Mapping[str, object]) -> dict[str, object]:
    """``kwargs`` minus the plugin's key (what may reach the Hugging Face processor)."""
    return {k: v for k, v in kwargs.items() if k != POLICY_KEY}
