"""Charge a pruned image's encoder work to vLLM's encoder budget at its unpruned size.

vLLM's scheduler admits images into an engine step while their embedding counts fit the step's
encoder compute budget (``Scheduler._try_schedule_encoder_inputs`` and
``EncoderCacheManager.can_allocate``, both reading ``mm_position.get_num_embeds()``); vLLM profiled
its memory with that many *unpruned* images. A pruned image has fewer placeholders, but its whole
vision tower still runs (plus the plugin's scoring): at ratio 0.9 a step would take about ten times
as many images as the profile. This module makes each image cost what its encoder computes (its
scheduler wrappers are in :mod:`.patches`): the processor writes the unpruned count
(``FIELD_ENCODED``), ``Scheduler.add_request`` turns it into a per-image surcharge, and during
``_try_schedule_encoder_inputs`` the cache manager's compute check sees the budget less the
surcharges of the images admitted so far and of the image asked about; the budget the step
carries on to the next request is lowered by the admitted images' surcharges. The
encoder *cache* is still charged at the pruned count (it holds the pruned rows). An image that fits
vLLM's budget unpruned fits it here, so no request starves: each step admits at least the first image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlmprune.vllm_plugin.fields import FIELD_ENCODED


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


CHARGE_UNPRUNED = True
"""False only to measure what happens without the charge (``bench/encoder_memory.py``, in the
engine's own process, before the engine starts)."""


def mark_request(request: Any) -> None:
    """Engine core, as a request arrives (``Scheduler.add_request``, :mod:`.patches`): its pruned
    images' surcharges. Requests without any go through vLLM's scheduling untouched."""
    surcharges = encoder_surcharges(request.mm_features) if CHARGE_UNPRUNED else {}
    if surcharges:
        request.vlmprune_encoder_surcharges = surcharges


@contextmanager
def charged(manager: Any, request: Any, surcharges: dict[int, int] | None) -> Iterator[None]:
    """During one ``_try_schedule_encoder_inputs`` call for ``request``: the cache manager's compute
    check sees the budget less the surcharges of the images admitted so far and of the image asked
    about (an instance attribute over ``can_allocate``, removed afterwards)."""
    if not surcharges:
        yield
        return
    original_can = manager.can_allocate
    admitted: list[int] = []

    def can_allocate(req: Any, input_id: int, budget: int, num_embeds_to_schedule: int) -> bool:
        extra = surcharges.get(input_id, 0) if req is request else 0
        spent = sum(surcharges.get(i, 0) for i in admitted)
        if not original_can(req, input_id, budget - spent - extra, num_embeds_to_schedule):
            return False
        admitted.append(input_id)
        return True

    manager.can_allocate = can_allocate
    try:
        yield
    finally:
        del manager.can_allocate


def admitted_surcharge(surcharges: dict[int, int] | None, inputs: list[int]) -> int:
    """What the step's encoder budget, carried on to later requests, loses beyond vLLM's own count."""
    return sum(surcharges.get(i, 0) for i in inputs) if surcharges else 0
