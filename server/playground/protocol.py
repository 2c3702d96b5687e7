"""Schemas of the playground's API (``/v1/vlmprune/...``), for validation and the OpenAPI schema."""

from __future__ import annotations

from pydantic import BaseModel


class MethodInfo(BaseModel):
    name: str
    stage: str
    route: str
    """How the engine serves it: ``in_llm`` (between the decoder layers), ``probe`` (at the LLM
    input, scored by the shallow probe) or ``pre_llm`` (``vlmprune.methods.served_route``)."""
    summary: str
    paper: str


class NamedPolicyInfo(BaseModel):
    name: str
    method: str
    ratio: float
    """The ratio under normal load."""
    max_ratio: float | None
    ratio_now: float
    """What a request naming this policy gets now (load-adaptive policies move under load)."""


class MethodsResponse(BaseModel):
    """What the served model supports: a client offers only these methods."""

    family: str
    methods: list[MethodInfo]
    policies: list[NamedPolicyInfo]
    default_policy: str
    ratio_step: float
    """Ratios are rounded to this step everywhere (``vlmprune.policy.RATIO_STEP``)."""
    max_ratio: float
    """Highest ratio the playground's slider offers."""
    tracing: bool
    """Whether kept-token overlays are available (the gateway knows the engines' trace folder)."""


class DemoScene(BaseModel):
    """One test-split sample of the testbed task, drawn as the served model sees the testbed."""

    index: int
    image: str
    """PNG data URL."""
    question: str
    answer: str
    """The expected answer."""
    family: str
    """Question family (attribute, count, presence, position, glyph)."""


class OverlayPanel(BaseModel):
    name: str
    tokens: list[int]
    """Image-local token indices drawn in this panel."""
    boxes: list[tuple[float, float, float, float]]
    """Per token ``x0, y0, x1, y1`` as fractions of the image's width and height."""


class TracedImage(BaseModel):
    width: int
    height: int
    visual_tokens: int
    """Prunable tokens of the image."""
    kept_count: int
    """Prunable tokens the gateway counted as kept (the plugin's rule)."""
    kept: list[int] | None = None
    """Image-local indices the engine kept (None when no trace came back)."""
    panels: list[OverlayPanel] | None = None


class Stage(BaseModel):
    where: str
    kept: int
    of: int


class RunCost(BaseModel):
    baseline_flops: float
    """Analytic prefill FLOPs at ratio 0."""
    actual_flops: float
    saved_fraction: float


class TraceResponse(BaseModel):
    """One playground run, after its answer: what the engine kept and what it cost."""

    id: str
    status: int
    """The HTTP status the chat request ended with (499: the client left)."""
    applied: str
    """The ``X-VLMPrune-Applied`` value."""
    family: str
    images: list[TracedImage]
    stages: list[Stage]
    """Visual tokens per pruning stage of the serving path."""
    cost: RunCost | None = None
    overlay_note: str | None = None
    """Why there is no overlay, when there is none."""
