"""The playground's logic: methods of the served model, demo scenes, and traced runs.

A playground run is an ordinary chat request with an ``X-VLMPrune-Trace`` id. When it ends, the
chat serving layer hands its outcome (policy, images, cost) to :class:`RunStore`; the page then asks
``/v1/vlmprune/traces/{id}`` for it, and the gateway joins it with the engine's own record of the
kept indices (:mod:`vlmprune.trace`, written in the worker's ``embed_multimodal``). The overlay is
therefore the serving path's selection; the gateway only places those indices on the image with
the token geometry the engine reported (:func:`vlmprune.visualize.layout_of`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import GatewayError
from server.playground.protocol import (
    DemoScene,
    MethodInfo,
    MethodsResponse,
    NamedPolicyInfo,
    OverlayPanel,
    RunCost,
    Stage,
    TracedImage,
    TraceResponse,
)
from vlmprune.methods import METHODS, served_route, vllm_serves
from vlmprune.policy import RATIO_STEP
from vlmprune.trace import check_trace_id, pop_trace

MIN_SCENE_PX = 224
"""Smallest canvas a demo scene is drawn on: a model with a smaller input (the tests' tiny models)
still gets a legible scene, which its processor resizes like any upload."""
MAX_RATIO = 0.95
"""The slider's top: the highest ratio of the project's tables."""
EXPLAIN_WEIGHTS = "vlmprune_explain_cnn.pt"
"""The explain method's CNN beside the model (without it the engine refuses ``explain``)."""


@dataclass
class Run:
    """What the gateway knows of a finished traced request."""

    status: int
    method: str
    applied: str
    family: str
    sizes: list[tuple[int, int]]
    visual_tokens: list[int]
    kept: list[int]
    cost: RunCost | None

    @classmethod
    def finished(cls, prep: Any, status: int, family: str, cost: Any) -> Run:
        """From the chat layer's ``Prepared`` request and its ``RequestCost`` (None: not served)."""
        saved = None if cost is None else RunCost(
            baseline_flops=cost.baseline_flops, actual_flops=cost.actual_flops,
            saved_fraction=1.0 - cost.actual_flops / cost.baseline_flops if cost.baseline_flops else 0.0,
        )
        return cls(status=status, method=prep.resolved.method, applied=prep.applied().header(), family=family, sizes=list(prep.sizes),
                   visual_tokens=[t.prunable for t in prep.images], kept=list(prep.kept), cost=saved)


class RunStore:
    """The last ``capacity`` finished traced runs, by trace id (bounded: old ones fall out)."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._runs: OrderedDict[str, Run] = OrderedDict()

    def add(self, trace_id: str, run: Run) -> None:
        self._runs[trace_id] = run
        self._runs.move_to_end(trace_id)
        while len(self._runs) > self.capacity:
            self._runs.popitem(last=False)

    async def wait(self, trace_id: str, timeout_s: float) -> Run | None:
        """The run, waiting up to ``timeout_s`` (a stream's last bytes reach the page slightly
        before the gateway has finished its accounting)."""
        deadline = time.monotonic() + timeout_s
        while trace_id not in self._runs and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self._runs.get(trace_id)


def methods_for(state: Any, model: Any) -> MethodsResponse:
    """The methods the served model supports (family, and explain's CNN beside the model)."""
    family = model.family
    methods = []
    for spec in METHODS.values():
        if not vllm_serves(spec.name, family):  # fastv: not on the probe route
            continue
        if spec.name == "explain" and not (Path(model.model_dir) / EXPLAIN_WEIGHTS).is_file():
            continue
        methods.append(MethodInfo(name=spec.name, stage=spec.stage, route=served_route(spec.name, family),
                                  summary=spec.summary, paper=spec.paper))
    policies = [
        NamedPolicyInfo(name=name, method=p.method, ratio=p.ratio, max_ratio=p.max_ratio,
                        ratio_now=p.ratio_at(state.adapter.pressure))
        for name, p in state.policies.policies.items()
    ]
    return MethodsResponse(family=family, methods=methods, policies=policies, default_policy=state.policies.default,
                           ratio_step=RATIO_STEP, max_ratio=MAX_RATIO, tracing=state.settings.trace_dir is not None)


def demo_scene(model: Any, index: int | None) -> DemoScene:
    """A test-split sample drawn at the canvas and object scale the served model reads the testbed
    at (``vlmprune.testbed.registry.scene_layout``; at least :data:`MIN_SCENE_PX`); random when
    ``index`` is None."""
    from vlmprune.testbed import scenes
    from vlmprune.testbed.example import render_for

    if index is None:
        index = random.randrange(scenes.SPLIT_SIZE)
    try:
        sample, image = render_for(model.config, lambda scale: scenes.sample("test", index, scale), MIN_SCENE_PX)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="index") from None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return DemoScene(index=index, image=url, question=sample.question, answer=sample.answer, family=sample.family)


class Overlays:
    """Kept-token overlays from the engine's trace records; the image processor loaded once."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._image_processor: Any = None

    def image_processor(self) -> Any:
        if self._image_processor is None and self.model.family == "llava":  # its resize/crop box
            from transformers import AutoImageProcessor

            self._image_processor = AutoImageProcessor.from_pretrained(self.model.model_dir)
        return self._image_processor

    def panels(self, record: dict[str, Any], size: tuple[int, int]) -> list[OverlayPanel] | None:
        """The record's tokens placed on an image of ``size``; None without geometry (an unpruned
        LLaVA-NeXT image: the stock path never builds it)."""
        from vlmprune.visualize import layout_of

        if record.get("grid") is None:
            return None
        layout = layout_of(record["family"], record["n_tokens"], record["grid"], size, self.image_processor(),
                           view=record.get("view"), coords=record.get("coords"), view_shape=record.get("view_shape"))
        w, h = size
        return [
            OverlayPanel(name=p.name, tokens=p.tokens.tolist(),
                         boxes=[(x0 / w, y0 / h, x1 / w, y1 / h) for x0, y0, x1, y1 in p.boxes.tolist()])
            for p in layout.panels
        ]


def in_llm_stages(records: list[dict[str, Any]], of: int) -> list[Stage]:
    """The LLM input, then each in-LLM stage (``after layer k``), summed over the request's images."""
    out = [Stage(where="LLM input", kept=sum(len(r["input_kept"]) for r in records), of=of)]
    for i, stage in enumerate(records[0]["stages"]):
        out.append(Stage(where=f"after layer {stage['after_layer']}",
                         kept=sum(len(r["stages"][i]["kept"]) for r in records), of=of))
    return out


async def trace_of(state: Any, trace_id: str, wait_s: float = 3.0) -> TraceResponse:
    """The finished run ``trace_id`` with the engine's kept indices; 404 when the gateway has no
    such run (never sent, still running, or fallen out of the store)."""
    try:
        check_trace_id(trace_id, "trace id")
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="trace_id") from None
    run = await state.runs.wait(trace_id, wait_s)
    if run is None:
        raise GatewayError(404, f"no finished playground run {trace_id!r} on this gateway (runs are kept for "
                           f"the last {state.runs.capacity} traced requests)", param="trace_id")
    records, note = None, None
    if state.settings.trace_dir is None:
        note = "kept-token overlays are off: the gateway has no trace_dir (VLMPRUNE_TRACE_DIR)"
    elif run.status != 200:
        note = f"the request ended with status {run.status}"
    else:
        folder = Path(state.settings.trace_dir)
        deadline = time.monotonic() + wait_s
        while (records := pop_trace(folder, trace_id, len(run.sizes))) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if records is None:
            note = (f"the engine wrote no trace into {folder} (does vLLM run with VLMPRUNE_TRACE_DIR set to "
                    "the same folder?)")
    overlays = state.overlays()
    images = []
    for i, (size, n, k) in enumerate(zip(run.sizes, run.visual_tokens, run.kept)):
        record = records[i] if records else None
        panels = overlays.panels(record, size) if record else None
        if record and record.get("stages"):  # in-LLM stages: the overlay shows what the deepest layers see
            k = len(record["kept"])
        images.append(TracedImage(width=size[0], height=size[1], visual_tokens=n, kept_count=k,
                                  kept=record["kept"] if record else None, panels=panels))
    if records and all(r.get("stages") for r in records):
        stages = in_llm_stages(records, sum(run.visual_tokens))
    else:
        # The probe methods prune once, at the LLM input, the count with the FLOPs of their
        # layer-averaged schedule (the image's plan on the probe route, vlmprune.reduction.plan).
        where = "LLM input, every layer (in-LLM schedule as its layer average)" if METHODS[run.method].stage == "in_llm" \
            else "LLM input"
        stages = [Stage(where=where, kept=sum(run.kept), of=sum(run.visual_tokens))]
    return TraceResponse(id=trace_id, status=run.status, applied=run.applied, family=run.family, images=images,
                         stages=stages, cost=run.cost, overlay_note=note)
