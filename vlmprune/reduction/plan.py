"""One plan per image: how a policy is served on one image, decided in one place.

Every count of visual tokens the project reports or relies on is read from an :class:`ImagePlan`:
the gateway's kept counts, ``stages=`` header and FLOPs metrics, the vLLM processor's placeholders,
the worker's in-LLM stages, the reference backend's input reduction and stages, the FLOPs model.
:func:`plan_image` computes it from the policy, the model family, the route the engine serves the
method on (:func:`vlmprune.methods.served_route`, or ``reference`` for the transformers backend),
the image's prunable tokens per view and the LLM's depth.

Routes and what enters the LLM (``n`` = prunable tokens of the image, summed over its views):

- ``none`` (no policy, ratio 0): all ``n``;
- ``pre_llm`` / ``probe`` (vLLM once at the LLM input): ``image_kept_count(view_sizes, ratio)``,
  each view budgeted by itself; no stage inside the LLM (the progressive methods are pruned once to
  the count with the LLM FLOPs of their layer-averaged ratio);
- ``reference`` (the transformers backend, the papers' placement): the progressive methods'
  schedule (:func:`vlmprune.reduction.stages.stage_plan`) over the whole image, its first stage at
  the LLM input and the others between decoder layers; the other methods as ``pre_llm``;
- ``in_llm`` (vLLM between the decoder layers): as ``reference``, except that TransPrune's input
  stage runs inside the LLM at layer 0 (its placeholders keep all ``n``: it scores with layer-0
  attention over every row), so the rows entering each decoder layer equal the reference's;
  explain (not progressive) likewise: all ``n`` enter, one stage at layer 0 keeps
  ``image_kept_count(view_sizes, ratio)``.

Stages that remove nothing are not planned. Fixed rows (LLaVA-NeXT's newlines) are never pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlmprune.core import schedule
from vlmprune.methods import METHODS, served_route
from vlmprune.policy import image_kept_count
from vlmprune.reduction.stages import stage_plan, transprune_window

Route = Literal["none", "pre_llm", "probe", "in_llm", "reference", "refused"]


@dataclass(frozen=True)
class ImagePlan:
    """How one image is served: the route, the tokens entering the LLM, the stages inside it."""

    route: Route
    """``refused``: vLLM does not serve the method here (its processor answers the 400); counted
    as ``pre_llm`` would be, so the gateway can still report the request's costs."""
    view_sizes: tuple[int, ...]
    """Prunable tokens per view (LLaVA-NeXT: thumbnail, then each crop; one view otherwise)."""
    fixed: int
    """Rows always kept (LLaVA-NeXT's newlines)."""
    num_layers: int
    entering: int
    """Prunable tokens entering the first decoder layer's input, i.e. in the prompt (placeholders
    are ``entering + fixed``)."""
    stages: tuple[tuple[int, int], ...] = ()
    """``(layer, prunable tokens kept)`` inside the LLM, in order: from decoder layer ``layer`` on
    (``0``: TransPrune's input stage, or explain's choice, on the ``in_llm`` route, scored at layer 0)."""
    window: tuple[int, int] = (0, -1)
    """TransPrune: the 0-based decoder layers (first, last) whose token transitions it sums."""

    @property
    def prunable(self) -> int:
        return sum(self.view_sizes)

    @property
    def prompt_tokens(self) -> int:
        """Placeholder rows of the image in the prompt."""
        return self.entering + self.fixed

    @property
    def final(self) -> int:
        """Prunable tokens left after the last stage."""
        return self.stages[-1][1] if self.stages else self.entering

    def per_layer(self) -> list[int]:
        """Prunable tokens entering each decoder layer (the FLOPs model's input)."""
        return schedule.counts_per_layer([(0, self.entering), *self.stages], self.entering, self.num_layers)


def plan_image(
    policy: Any,
    family: str,
    view_sizes: int | Sequence[int],
    num_layers: int,
    *,
    fixed: int = 0,
    route: Route | None = None,
) -> ImagePlan:
    """The plan of one image under ``policy`` (None: unpruned) on ``family``.

    ``route``: None is how vLLM serves the method in this process
    (:func:`vlmprune.methods.served_route`); ``reference`` the transformers backend."""
    sizes = (int(view_sizes),) if isinstance(view_sizes, int) else tuple(int(n) for n in view_sizes)
    n = sum(sizes)
    base = dict(view_sizes=sizes, fixed=fixed, num_layers=num_layers)
    if policy is None or policy.ratio <= 0.0:
        return ImagePlan("none", entering=n, **base)
    if route is None:
        route = served_route(policy.method, family)
    progressive = METHODS[policy.method].stage == "in_llm"
    if route == "in_llm" and not progressive:  # explain: its LLM-input choice runs at layer 0
        keep = image_kept_count(sizes, policy.ratio)
        return ImagePlan(route, entering=n, stages=((0, keep),) if keep < n else (), **base)
    if route in ("pre_llm", "probe", "refused") or (route == "reference" and not progressive):
        return ImagePlan(route, entering=image_kept_count(sizes, policy.ratio), **base)
    if route not in ("reference", "in_llm"):
        raise ValueError(f"unknown route {route!r}")
    (_, first), *later = stage_plan(policy, n, num_layers)
    later = later if any(count < first for _, count in later) else []
    window = transprune_window([layer for layer, _ in later], num_layers) if policy.method == "transprune" else (0, -1)
    if route == "in_llm" and policy.method == "transprune":  # its input stage runs at layer 0
        stages = ([(0, first)] if first < n else []) + later
        return ImagePlan(route, entering=n, stages=tuple(stages), window=window, **base)
    return ImagePlan(route, entering=first, stages=tuple(later), window=window, **base)


def request_stages(plans: Sequence[ImagePlan]) -> list[tuple[int, list[int]]]:
    """The stages of one request of several images, ``(layer, counts per image)``: the images share
    their schedule's layers; an image none of whose stages removes a token keeps what entered."""
    layers = sorted({layer for plan in plans for layer, _ in plan.stages})
    out = []
    for layer in layers:
        counts = []
        for plan in plans:
            current = plan.entering
            for at, count in plan.stages:
                if at <= layer:
                    current = count
            counts.append(current)
        out.append((layer, counts))
    return out
