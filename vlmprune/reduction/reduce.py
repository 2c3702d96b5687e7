"""One image's reduction at the LLM input: policy + signals -> :class:`TokenReduction`.

Counts: ``keep`` prunable tokens survive, ``keep = kept_count(n_prunable, ratio)`` for pre-LLM and
instruction-aware methods; for the progressive methods (TransPrune, AIM) ``keep`` is the count of
the scaled schedule's stage at the LLM input (:func:`vlmprune.reduction.stages.stage_plan`).
Non-prunable tokens (LLaVA-NeXT's image_newline tokens) always survive, so
``count == keep + n_non_prunable``. Ratio 0 (or a stage that keeps everything) returns the identity.

Each method's choice is a pure function of :mod:`vlmprune.core`; this module only routes the
right signals and geometry to it and maps the result back to the image's token indices. Both
backends call it: the transformers reference backend and the vLLM plugin reduce an image the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.core import aim, baselines, explain, fastervlm, globalcom2, transprune
from vlmprune.core.select import TokenReduction, allocate_exact
from vlmprune.methods import require_support
from vlmprune.policy import PolicyError, kept_count
from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC, ImageTokens
from vlmprune.reduction.stages import stage_plan

_SIGNALS: dict[str, frozenset[str]] = {
    "fastervlm": frozenset({CLS_ATTENTION}),
    "globalcom2": frozenset({CLS_LOGITS}),
    "aim": frozenset({MERGE_METRIC}),
}


def signals_needed(method: str) -> frozenset[str]:
    """Vision-side signals ``method`` scores with (what the adapter's hooks must capture)."""
    return _SIGNALS.get(method, frozenset())


def input_keep(policy: Any, n_prunable: int, num_layers: int | None = None) -> int:
    """Prunable tokens of one image that reach the LLM input under ``policy``."""
    if policy.ratio == 0.0:
        return n_prunable
    if policy.method in ("transprune", "aim"):
        if num_layers is None:
            raise ValueError(f"num_layers is required for the progressive method {policy.method!r}")
        return stage_plan(policy, n_prunable, num_layers)[0][1]
    return kept_count(n_prunable, policy.ratio)


def needs_instruction_attention(policy: Any, n_prunable: int, num_layers: int) -> bool:
    """Whether reducing an image with ``n_prunable`` tokens reads layer-0 instruction attention."""
    if policy.method == "explain":
        return input_keep(policy, n_prunable) < n_prunable
    if policy.method == "transprune":
        return input_keep(policy, n_prunable, num_layers) < n_prunable
    return False


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
    require_support(policy.method, family)
    n_prunable = image.n_prunable
    keep = input_keep(policy, n_prunable, num_layers)
    if keep >= n_prunable:
        return TokenReduction.identity(image.n_tokens, device=image.features.device)
    prunable = image.prunable.bool()
    method = policy.method

    if method == "fastervlm":
        return fastervlm.reduce(_signal(image, CLS_ATTENTION), prunable, keep, groups=image.view)
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
        return _per_view(image, keep, lambda x, m, _grid, k: aim.merge_to_count(x, m, k), metric)
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


def _per_view(image: ImageTokens, keep: int, merge, metric: torch.Tensor | None = None) -> TokenReduction:
    """Apply a merging reducer ``merge(x (m, C), metric (m, C'), grid, k) -> TokenReduction`` to
    each view's prunable tokens (one grid on LLaVA/Qwen), budgets split exactly by view size;
    non-prunable tokens pass through with their own features. Output ascending by index."""
    prunable = image.prunable.bool()
    metric = image.features if metric is None else metric
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
        red = merge(image.features[members], metric[members], tuple(grid), int(budget))
        index_parts.append(members[red.index.to(members.device)])
        feature_parts.append(red.apply(image.features[members]).to(image.features.dtype))
    index = torch.cat(index_parts)
    order = torch.argsort(index)
    return TokenReduction(index=index[order], features=torch.cat(feature_parts)[order])
