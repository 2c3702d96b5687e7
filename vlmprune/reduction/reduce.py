"""One image's reduction at the LLM input: policy + signals -> :class:`TokenReduction`.

Counts: ``keep`` prunable tokens survive, what the image's plan on the reference route says enters
the LLM (:func:`vlmprune.reduction.plan.plan_image`): ``image_kept_count(view_sizes, ratio)`` for
pre-LLM and instruction-aware methods; for the progressive methods (TransPrune, AIM, FastV) the
scaled schedule's stage at the LLM input.
Non-prunable tokens (LLaVA-NeXT's image_newline tokens) always survive, so
``count == keep + n_non_prunable``. Ratio 0 (or a stage that keeps everything) returns the identity.

Each method's choice is a pure function of :mod:`vlmprune.core`; this module only routes the
right signals and geometry to it and maps the result back to the image's token indices. Both
backends call it: the transformers reference backend and the vLLM plugin reduce an image the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlmprune.core import aim, baselines, explain, fastervlm, globalcom2, transprune
from vlmprune.core.select import TokenReduction, allocate_exact
from vlmprune.methods import require_support
from vlmprune.policy import PolicyError, view_kept_counts
from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC, VISION_FEATURES, ImageTokens
from vlmprune.reduction.plan import plan_image

_SIGNALS: dict[str, frozenset[str]] = {
    "fastervlm": frozenset({CLS_ATTENTION}),
    "globalcom2": frozenset({CLS_LOGITS}),
    "aim": frozenset({MERGE_METRIC}),
}
_PRE_PROJECTOR_MERGE = ("llava", "llava_next")
"""Families whose AIM merge runs on the projector's input (``VISION_FEATURES``), then projects."""


def signals_needed(method: str, family: str | None = None) -> frozenset[str]:
    """Vision-side signals ``method`` scores with on ``family`` (what the adapter's hooks must capture)."""
    needs = _SIGNALS.get(method, frozenset())
    if method == "aim" and family in _PRE_PROJECTOR_MERGE:
        needs = needs | {VISION_FEATURES}
    return needs


def needs_instruction_attention(policy: Any, family: str, view_sizes: int | Sequence[int], num_layers: int) -> bool:
    """Whether reducing an image with these prunable tokens per view reads layer-0 instruction attention."""
    if policy.method not in ("explain", "transprune"):
        return False
    plan = plan_image(policy, family, view_sizes, num_layers, route="reference")
    return plan.entering < plan.prunable


def reduce_image(
    policy: Any,
    family: str,
    image: ImageTokens,
    *,
    instruction_attention: torch.Tensor | None = None,
    explain_model: Any = None,
    num_layers: int | None = None,
) -> TokenReduction:
    """Which of ``image``'s tokens (or which merged tokens) enter the LLM.

    ``instruction_attention`` (n,): layer-0 instruction->token attention over this image's tokens
    (explain, TransPrune's stage 0). ``explain_model``: a :class:`vlmprune.core.explain.RelevanceCNN`.
    ``num_layers``: decoder depth, for the progressive methods' schedules.
    """
    spec = require_support(policy.method, family)
    n_prunable = image.n_prunable
    if num_layers is None and spec.stage == "in_llm":
        raise ValueError(f"num_layers is required for the progressive method {policy.method!r}")
    keep = plan_image(policy, family, image.view_sizes, num_layers or 0, route="reference").entering
    if keep >= n_prunable:
        return TokenReduction.identity(image.n_tokens, device=image.features.device)
    prunable = image.prunable.bool()
    method = policy.method

    if method == "fastervlm":
        budgets = view_kept_counts(image.view_sizes, policy.ratio)  # one per view, summing to keep
        return fastervlm.reduce(_signal(image, CLS_ATTENTION), prunable, budgets, groups=image.view_key())
    if method == "globalcom2":
        _require_anyres(image, method)
        return globalcom2.reduce(
            _signal(image, CLS_LOGITS),
            image.view,
            image.crop,
            image.coords,
            image.view_shape,
            image.crop_grid,
            keep,
            temperature=policy.temperature,
            alpha=policy.alpha,
        )
    if method == "random":
        return baselines.random_reduce(prunable, keep, policy.seed)
    if method == "pool":
        return _per_view(image, keep, lambda x, _metric, grid, k: baselines.pool_reduce(x, grid, k))
    if method == "aim":
        metric = _signal(image, MERGE_METRIC)
        merge = lambda x, m, _grid, k: aim.merge_to_count(x, m, k)  # noqa: E731
        if family in _PRE_PROJECTOR_MERGE:
            # As the official code: merge the projector's input (CLIP features), then project.
            if image.project is None:
                raise ValueError("AIM on the LLaVA family needs the image's projector (ImageTokens.project)")
            return _per_view(image, keep, merge, metric, values=_signal(image, VISION_FEATURES), project=image.project)
        return _per_view(image, keep, merge, metric)  # Qwen: the merger's output, the LLM's own input
    if method in ("explain", "transprune"):
        if instruction_attention is None or instruction_attention.shape != (image.n_tokens,):
            raise ValueError(
                f"method {method!r} needs instruction_attention of shape ({image.n_tokens},), got "
                f"{None if instruction_attention is None else tuple(instruction_attention.shape)}"
            )
        candidates, attn = prunable_values(image, instruction_attention)
        if method == "explain":
            if explain_model is None:
                raise PolicyError("method 'explain' needs a RelevanceCNN (policy field 'checkpoint')")
            chosen = explain.reduce(explain_model.relevance(attn), keep)
        else:
            chosen = transprune.reduce(transprune.combine(None, attn), keep)
        return _with_fixed(image, candidates[chosen.to(candidates.device)])
    raise PolicyError(f"method {method!r} has no LLM-input reduction in the reference backend")


def prunable_values(image: ImageTokens, per_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(candidates, values)``: the image's prunable token indices (n_prunable,) and ``per_token``
    (n,) at them, in sequence order.

    Explain and TransPrune score only the prunable tokens (newlines are not image content). This is
    the one place that slicing happens, so the explain CNN's training input
    (:meth:`vlmprune.backends.hf.pipeline.ReferenceBackend.explain_inputs`) is by construction the
    vector it scores at inference."""
    candidates = image.prunable.bool().nonzero().squeeze(1)  # (n_prunable,)
    return candidates, per_token[candidates.to(per_token.device)]


def _signal(image: ImageTokens, name: str) -> torch.Tensor:
    value = image.signals.get(name)
    if value is None:
        raise ValueError(f"signal {name!r} was not gathered for this image (adapter needs={sorted(image.signals)})")
    return value


def _require_anyres(image: ImageTokens, method: str) -> None:
    if image.view is None or image.crop is None or image.coords is None or image.view_shape is None:
        raise PolicyError(f"method {method!r} needs AnyRes geometry (view/crop/coords), which this image lacks")


def _with_fixed(image: ImageTokens, chosen: torch.Tensor) -> TokenReduction:
    """Chosen prunable token indices + every non-prunable token, ascending."""
    keep_mask = ~image.prunable.bool()
    keep_mask[chosen] = True
    return TokenReduction(index=keep_mask.nonzero().squeeze(1))


def _per_view(
    image: ImageTokens,
    keep: int,
    merge,
    metric: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    project=None,
) -> TokenReduction:
    """Apply a merging reducer ``merge(x (m, C), metric (m, C'), grid, k) -> TokenReduction`` to
    each view's prunable tokens (one grid on LLaVA/Qwen), budgets split exactly by view size;
    non-prunable tokens pass through with their own features. Output ascending by index.

    ``values`` (n, C): what is merged (default: the features); ``project`` maps a merged view's
    output values to LLM features (AIM on LLaVA merges CLIP features, then projects). A view with
    nothing merged keeps its own features."""
    prunable = image.prunable.bool()
    metric = image.features if metric is None else metric
    values = image.features if values is None else values
    if image.view is None:
        groups = [(prunable.nonzero().squeeze(1), image.grid)]
    else:
        groups = []
        for g in (0, 1):
            members = (prunable & (image.view == g)).nonzero().squeeze(1)
            if members.numel():
                groups.append((members, image.view_shape[g]))
    sizes = torch.tensor([m.numel() for m, _ in groups], dtype=torch.long)
    budgets = allocate_exact(keep, sizes.double(), sizes).tolist()

    index_parts = [(~prunable).nonzero().squeeze(1)]
    feature_parts = [image.features[index_parts[0]]]
    for (members, grid), budget in zip(groups, budgets):
        if budget == 0:
            continue
        red = merge(values[members], metric[members], tuple(grid), int(budget))
        index_parts.append(members[red.index.to(members.device)])
        if red.features is None:  # nothing merged in this view
            merged = image.features[members][red.index.to(members.device)]
        else:
            merged = red.features if project is None else project(red.features)
        feature_parts.append(merged.to(image.features.device, image.features.dtype))
    index = torch.cat(index_parts)
    order = torch.argsort(index)
    return TokenReduction(index=index[order], features=torch.cat(feature_parts)[order])
