"""Stage plans of the progressive methods (TransPrune, AIM, FastV): how many tokens each stage keeps.

The paper schedules and their scaling to a layer-averaged ``ratio`` are :mod:`vlmprune.core.schedule`;
this module applies them to one policy and one image (:func:`stage_plan`, read by
:func:`vlmprune.reduction.plan.plan_image`), and holds the row bookkeeping both backends' stages share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmprune.core import schedule
from vlmprune.policy import PolicyError


def instruction_start(prompt_ids: Sequence[int], after_images: int, vision_end: int | None = None) -> int:
    """The prompt row where the instruction starts, for every backend: right after the last image's
    rows (``after_images``; 0 without images), past Qwen's ``<|vision_end|>`` (``vision_end``), which
    closes the image and is not instruction. The instruction runs from there to the prompt's end."""
    if vision_end is not None and after_images < len(prompt_ids) and int(prompt_ids[after_images]) == vision_end:
        return after_images + 1
    return after_images


def progressive_schedule(policy: Any, num_layers: int) -> list[schedule.Stage]:
    """The paper schedule of a progressive policy scaled to its layer-averaged ``ratio``.

    FastV's one stage is solved for the ratio directly (:func:`vlmprune.core.schedule.fastv_stages`);
    a ``layer`` the served LLM cannot take is a :class:`PolicyError`."""
    if policy.method == "fastv":
        try:
            return schedule.fastv_stages(num_layers, policy.ratio, policy.layer)
        except ValueError as exc:
            raise PolicyError(f"field 'layer': {exc} (got {policy.layer!r})") from None
    if policy.method == "transprune":
        stages = schedule.transprune_stages(num_layers)
    elif policy.method == "aim":
        stages = schedule.aim_stages(num_layers, policy.merge_keep)
    else:
        raise ValueError(f"method {policy.method!r} has no progressive schedule")
    return schedule.scale_to_ratio(stages, num_layers, policy.ratio)


def stage_plan(policy: Any, n_prunable: int, num_layers: int) -> list[tuple[int, int]]:
    """``(after_layer, prunable tokens kept)`` per stage; the first stage is the LLM input (layer 0)."""
    plan = schedule.stage_counts(progressive_schedule(policy, num_layers), n_prunable)
    if not plan or plan[0][0] != 0:
        plan = [(0, n_prunable), *plan]
    return plan


def transprune_window(stage_layers: list[int], num_layers: int) -> tuple[int, int]:
    """0-based decoder layers (first, last) whose TTV TransPrune accumulates.

    The released code accumulates over 1-based layers 7..12 with stages after 7/9/12: from the
    layer that ends the first stage to the layer that ends the last one. The same rule is applied
    to depth-scaled schedules (a 4-layer model with stages after 1/2 accumulates layers 0..1).
    A stage at the LLM input (after 0 layers) has no TTV yet and is ignored here.
    ``stage_layers``: the in-LLM stages of the reference backend (the schedule without its
    LLM-input stage), which both backends pass.
    """
    positive = [s for s in stage_layers if s > 0]
    if not positive:
        return (0, -1)
    return (max(0, positive[0] - 1), min(num_layers - 1, positive[-1] - 1))


def select_rows(choose, spans: list, counts: list[int], length: int, device) -> tuple[Any, list]:
    """One stage's kept rows of one sequence: every non-visual row plus, per image, the rows
    ``choose(rows, count)`` picks (local indices into ``rows``, ascending); all ascending.

    ``spans``: per image, (n_i,) its visual rows in the current sequence of ``length`` rows.
    Returns ``(keep (L',), new spans)``: each image's chosen rows re-expressed in the kept sequence.
    Both backends call this (the reference's progressive loop and the vLLM plugin's in-LLM stage).
    """
    import torch

    keep_mask = torch.ones(length, dtype=torch.bool, device=device)  # (L,)
    chosen = []
    for rows, count in zip(spans, counts):
        picked = rows if count == rows.numel() else rows[choose(rows, count)]
        keep_mask[rows] = False
        chosen.append(picked)
    for picked in chosen:
        keep_mask[picked] = True
    new_row = keep_mask.long().cumsum(0) - 1  # (L,) row of each kept token after the gather
    return keep_mask.nonzero().squeeze(1), [new_row[p] for p in chosen]


def remap_rows(keep, rows):
    """Rows of always-kept tokens (instruction) after gathering ``keep`` (ascending rows)."""
    import torch

    where = torch.searchsorted(keep, rows)  # (t,)
    if bool((where >= keep.numel()).any()) or not torch.equal(keep[where.clamp_max(keep.numel() - 1)], rows):
        raise ValueError("instruction tokens must never be pruned; an instruction index lies in a visual span")
    return where


def check_policy_depth(policy: Any, num_layers: int) -> None:
    """Raise :class:`PolicyError` if the policy names a layer the served LLM lacks (FastV's
    ``layer``), whatever the ratio, so a bad policy fails the same way at ratio 0."""
    if getattr(policy, "method", None) == "fastv":
        try:
            schedule.fastv_layer(num_layers, policy.layer)
        except ValueError as exc:
            raise PolicyError(f"field 'layer': {exc} (got {policy.layer!r})") from None
