"""Stage plans of the progressive methods (TransPrune, AIM, FastV): how many tokens each stage keeps.

The paper schedules and their scaling to a layer-averaged ``ratio`` are :mod:`vlmprune.core.schedule`;
this module applies them to one policy and one image, for the reduction at the LLM input
(:func:`vlmprune.reduction.reduce.input_keep`) and for the reference backend's in-LLM stages.
"""

from __future__ import annotations

from typing import Any

from vlmprune.core import schedule
from vlmprune.policy import PolicyError


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


def check_policy_depth(policy: Any, num_layers: int) -> None:
    """Raise :class:`PolicyError` if the policy names a layer the served LLM lacks (FastV's
    ``layer``), whatever the ratio, so a bad policy fails the same way at ratio 0."""
    if getattr(policy, "method", None) == "fastv":
        try:
            schedule.fastv_layer(num_layers, policy.layer)
        except ValueError as exc:
            raise PolicyError(f"field 'layer': {exc} (got {policy.layer!r})") from None
