"""Progressive (in-LLM) pruning schedules and their scaling to a layer-averaged ratio.

A schedule is a list of :class:`Stage`: after ``layer`` decoder layers have run (0 = at the LLM
input), only a fraction ``keep`` of the image's *original* visual tokens stays in the sequence.
Fractions never increase along the schedule.

FastV (:func:`fastv_stages`) has one stage after K and is not shape-scaled: its keep after K is
solved directly for the layer-averaged ratio (clamped at 0 above the reachable maximum).

``ratio`` for progressive methods means the fraction of visual tokens removed averaged over all
decoder layers, so equal ratios cost about equal LLM FLOPs across methods. The paper schedule
has its own ratio (TransPrune on a 32-layer LLM: 1 - 13.125/32 = 0.59). To meet another ratio:
- a lower ratio moves every stage's keep fraction toward 1 by the same share of its gap,
  ``g + lam * (1 - g)``;
- a higher ratio scales every stage's keep fraction down by the same factor, ``mu * g``, which
  also starts pruning at the LLM input (stage 0) when the paper schedule does not.
Both maps are linear in the layer average, so the solution is closed-form; integer counts then
come from :func:`vlmprune.policy.kept_count` (at least 1 token), except at a stage the paper
empties (``Stage.may_empty``: AIM's last stage), which uses the official ``int()`` and may keep 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmprune.policy import kept_count

REFERENCE_LAYERS = 32  # depth the papers' layer indices refer to (Vicuna-7B / LLaMA-7B)


@dataclass(frozen=True)
class Stage:
    layer: int
    """Tokens are removed after this many decoder layers (0 = before the first layer)."""
    keep: float
    """Fraction of the original visual tokens kept from here on."""
    may_empty: bool = False
    """The paper's schedule removes every visual token here (AIM's last stage): its count is the
    official ``int(n * keep)`` and may be 0. Other stages keep ``kept_count`` (at least 1)."""


def layer_average_keep(stages: list[Stage], num_layers: int) -> float:
    """Fraction of visual tokens present at each decoder layer's input, averaged over layers."""
    total = 0.0
    for layer in range(num_layers):
        total += keep_at_layer(stages, layer)
    return total / num_layers


def keep_at_layer(stages: list[Stage], layer: int) -> float:
    """Keep fraction seen by decoder layer ``layer`` (0-based)."""
    keep = 1.0
    for stage in stages:
        if stage.layer <= layer:
            keep = stage.keep
    return keep


def scale_to_ratio(stages: list[Stage], num_layers: int, ratio: float) -> list[Stage]:
    """The schedule with the same shape whose layer-averaged removed fraction is ``ratio``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    stages = _with_input_stage(stages)
    target = 1.0 - ratio
    current = layer_average_keep(stages, num_layers)
    if target >= current:
        lam = (target - current) / (1.0 - current) if current < 1.0 else 0.0
        scaled = [Stage(s.layer, s.keep + lam * (1.0 - s.keep), s.may_empty) for s in stages]
    else:
        mu = target / current
        scaled = [Stage(s.layer, s.keep * mu, s.may_empty) for s in stages]
    return scaled


def stage_counts(stages: list[Stage], n_visual: int) -> list[tuple[int, int]]:
    """Integer visual-token counts per stage, ``(layer, count)``: ``kept_count`` (round half up, at
    least 1) except where the paper's stage empties the image (``may_empty``: floor, as AIM's
    ``int()``, so 0 near the paper's ratio); a zero fraction keeps none."""
    out = []
    for s in stages:
        keep = min(1.0, max(0.0, s.keep))
        if keep <= 0.0:
            count = 0
        elif s.may_empty:
            count = min(n_visual, math.floor(n_visual * keep + 1e-9))
        else:
            count = kept_count(n_visual, 1.0 - keep)
        out.append((s.layer, count))
    return out


def counts_per_layer(counts: list[tuple[int, int]], n_visual: int, num_layers: int) -> list[int]:
    """Visual tokens entering each decoder layer, given ``(layer, count)`` stages (``n_visual`` before any)."""
    out = []
    for layer in range(num_layers):
        current = n_visual
        for stage_layer, count in counts:
            if stage_layer <= layer:
                current = count
        out.append(current)
    return out


def depth_scaled_layer(reference_layer: int, num_layers: int) -> int:
    """Map a layer index given for a 32-layer LLM onto ``num_layers``, within [1, num_layers-1]."""
    scaled = round(reference_layer * num_layers / REFERENCE_LAYERS)
    return max(1, min(num_layers - 1, scaled)) if num_layers > 1 else 0


def transprune_stages(num_layers: int) -> list[Stage]:
    """TransPrune's paper schedule: after (1-based) layers 7/9/12 keep .875/.625/.125."""
    return _merge_same_layer(
        [Stage(depth_scaled_layer(layer, num_layers), keep) for layer, keep in ((7, 0.875), (9, 0.625), (12, 0.125))]
    )


FASTV_LAYER = 2
"""FastV's K on the 32-layer LLMs the paper measured (LLaVA-1.5-7B/13B): prune after layer 2."""


def fastv_layer(num_layers: int, layer: int | None = None) -> int:
    """FastV's K on ``num_layers``: the paper's K = 2 depth-scaled (:func:`depth_scaled_layer`:
    4 layers -> 1, 28 or 32 -> 2) when ``layer`` is None, else ``layer`` itself, in [1, num_layers-1]."""
    if num_layers < 2:
        raise ValueError(f"FastV needs at least 2 decoder layers (layers < K see every token), got {num_layers}")
    k = depth_scaled_layer(FASTV_LAYER, num_layers) if layer is None else int(layer)
    if not 1 <= k <= num_layers - 1:
        raise ValueError(f"FastV's layer K must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {k}")
    return k


def fastv_max_ratio(num_layers: int, layer: int | None = None) -> float:
    """Largest layer-averaged ratio FastV reaches: every visual token removed after K, ``(N-K)/N``."""
    k = fastv_layer(num_layers, layer)
    return (num_layers - k) / num_layers


def fastv_stages(num_layers: int, ratio: float, layer: int | None = None) -> list[Stage]:
    """FastV's single stage after K layers, with the keep fraction that makes the layer-averaged
    removed fraction ``ratio``: ``keep = 1 - ratio * N / (N - K)``.

    Layer-averaged like the other in-LLM methods, so equal ratios cost about equal LLM FLOPs (the
    paper's R = 50 % at K = 2 of 32 layers is ratio 0.469 here; ratio 0.5 keeps 46.7 % after layer 2).
    Above :func:`fastv_max_ratio` (0.9375 on 32 layers, 0.75 on the 4-layer demo LM) the keep is
    clamped to 0: every visual token leaves after K and the achieved ratio is the maximum, which the
    per-layer counts (and so the FLOPs model and ``kept_per_layer``) report. FastV never prunes
    before K (no stage at the LLM input: layers < K see every token, as the paper).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    k = fastv_layer(num_layers, layer)
    keep = max(0.0, 1.0 - ratio * num_layers / (num_layers - k))
    return [Stage(0, 1.0), Stage(k, keep)]


AIM_QWEN_LAYERS = 28
"""Depth of the LLM the official AIM Qwen code schedules (Qwen2 / Qwen2-VL / Qwen2.5-VL-7B)."""


def aim_stages(num_layers: int, merge_keep: float) -> list[Stage]:
    """AIM's image schedule: merge to ``merge_keep`` before the LLM, then keep 12.5 % fewer of the
    merged tokens after each of 8 consecutive layers, none after the last (``may_empty``).

    The official code's ``retain_rate``: on 32 layers (Vicuna, ``layer_i >= 13``) after (1-based)
    layers 14-21; on 28 layers (Qwen, ``layer_i >= 14``) after layers 15-22. Other depths scale the
    32-layer indices (:func:`depth_scaled_layer`).
    """
    stages = [Stage(0, merge_keep)]
    for step in range(1, 9):
        if num_layers == AIM_QWEN_LAYERS:
            layer = 14 + step
        else:
            layer = depth_scaled_layer(13 + step, num_layers)
        stages.append(Stage(layer, merge_keep * max(0.0, 1.0 - 0.125 * step), may_empty=step == 8))
    return _merge_same_layer(stages)


def _with_input_stage(stages: list[Stage]) -> list[Stage]:
    if stages and stages[0].layer == 0:
        return list(stages)
    return [Stage(0, 1.0), *stages]


def _merge_same_layer(stages: list[Stage]) -> list[Stage]:
    out: list[Stage] = []
    for s in stages:
        if out and out[-1].layer == s.layer:
            out[-1] = Stage(s.layer, min(out[-1].keep, s.keep), out[-1].may_empty or s.may_empty)
        else:
            out.append(s)
    return out
