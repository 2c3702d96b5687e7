"""Charge a pruned image's encoder work to vLLM's encoder budget at its unpruned size.

vLLM's scheduler admits images into an engine step while their embedding counts fit the step's
encoder compute budget (``Scheduler._try_schedule_encoder_inputs`` and
``EncoderCacheManager.can_allocate``, both reading ``mm_position.get_num_embeds()``); vLLM profiled
its memory with that many *unpruned* images. A pruned image has fewer placeholders, but its whole
vision tower still runs (plus the plugin's scoring): at ratio 0.9 a step would take about ten times
as many images as the profile. This hook makes each image cost what its encoder computes: the
processor writes the unpruned count (``FIELD_ENCODED``), ``Scheduler.add_request`` turns it into a
per-image surcharge, and during ``_try_schedule_encoder_inputs`` the cache manager's compute check
sees the budget less the surcharges of the images admitted so far and of the image asked about; the
budget the step carries on to the next request is lowered by the admitted images' surcharges. The
encoder *cache* is still charged at the pruned count (it holds the pruned rows). An image that fits
vLLM's budget unpruned fits it here, so no request starves: each step admits at least the first image.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.vllm_plugin.common import FIELD_ENCODED


def encoder_surcharges(mm_features: Any) -> dict[int, int]:
    """Per multimodal input index, unpruned minus placeholder embeddings (only where positive)."""
    out: dict[int, int] = {}
    for i, feature in enumerate(mm_features or []):
        data = getattr(feature, "data", None)
        if data is None or FIELD_ENCODED not in data:
            continue
        encoded = int(torch.as_tensor(data[FIELD_ENCODED].data).reshape(-1)[0])
        extra = encoded - int(feature.mm_position.get_num_embeds())
        if extra > 0:
            out[i] = extra
    return out


def install_encoder_budget_hook() -> None:
    """Wrap ``Scheduler.add_request`` and ``Scheduler._try_schedule_encoder_inputs`` (engine-core
    process; every route); idempotent. Requests without surcharges go through untouched."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_vlmprune_encoder_budget", False):  # on the class: other hooks wrap these too
        return
    original_add = Scheduler.add_request
    original_schedule = Scheduler._try_schedule_encoder_inputs

    def add_request(self, request: Any) -> None:
        surcharges = encoder_surcharges(request.mm_features)
        if surcharges:
            request.vlmprune_encoder_surcharges = surcharges
        return original_add(self, request)

    def _try_schedule_encoder_inputs(self, request: Any, *args: Any, **kwargs: Any):
        surcharges = getattr(request, "vlmprune_encoder_surcharges", None)
        if not surcharges:
            return original_schedule(self, request, *args, **kwargs)
        manager = self.encoder_cache_manager
        original_can = manager.can_allocate
        admitted: list[int] = []

        def can_allocate(req: Any, input_id: int, budget: int, num_embeds_to_schedule: int) -> bool:
            extra = surcharges.get(input_id, 0) if req is request else 0
            spent = sum(surcharges.get(i, 0) for i in admitted)
            if not original_can(req, input_id, budget - spent - extra, num_embeds_to_schedule):
                return False
            admitted.append(input_id)
            return True

        manager.can_allocate = can_allocate  # this call only (an instance attribute over the method)
        try:
            inputs, new_tokens, budget, *rest = original_schedule(self, request, *args, **kwargs)
        finally:
            del manager.can_allocate
        budget -= sum(surcharges.get(i, 0) for i in inputs)
        return (inputs, new_tokens, budget, *rest)

    Scheduler._vlmprune_encoder_budget = True  # type: ignore[attr-defined]
    Scheduler.add_request = add_request  # type: ignore[method-assign]
    Scheduler._try_schedule_encoder_inputs = _try_schedule_encoder_inputs  # type: ignore[method-assign]
