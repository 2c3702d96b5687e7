"""Schemas of the chat resource: the request the gateway validates, the answers it documents.

The request models type OpenAI's chat messages and the common sampling fields, so a malformed body
is refused at the gateway with one sentence naming the field (:mod:`server.validation`) instead of
reaching vLLM; other fields pass through to vLLM unchanged (``extra="allow"``). The gateway forwards
the body as received except for ``mm_processor_kwargs.vlmprune`` and images it had to normalise or
fetch (replaced by data URLs). The response models describe the answers in the OpenAPI document.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    """Known fields typed, strictly as JSON types (no ``"5"`` for 5, no ``"yes"`` for true); unknown
    ones kept and forwarded (vLLM has its own extensions)."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(min_length=1)
    """``data:image/...;base64,...``, or ``http(s)://`` where the operator enabled remote images."""
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
"""The content parts the gateway serves: text and images (other modalities are refused)."""


class SystemMessage(_Open):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Open):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ToolMessage(_Open):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(_Open):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatCompletionRequest(_Open):
    """The fields the gateway checks (OpenAI's types and ranges); all others pass through to vLLM."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    """OpenAI chat messages; images as ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    """``{"vlmprune": {"method", "ratio", ...options, "instruction"}}`` (headers override it)."""


# -- answers (documented in the OpenAPI schema; the gateway relays vLLM's bytes unchanged) --------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChoiceMessage(_Open):
    role: str
    content: str | None = None


class Choice(_Open):
    index: int
    message: ChoiceMessage
    finish_reason: str | None = None


class ChatCompletionResponse(_Open):
    """A non-streaming answer (a stream is ``text/event-stream`` of ``chat.completion.chunk``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class StreamEvent(BaseModel):
    """One server-sent event of a ``stream=true`` answer (OpenAPI 3.1: the schema of an event
    stream describes each event)."""

    data: str
    """A ``chat.completion.chunk`` as JSON; ``{"error": {...}}`` when the upstream failed during the
    stream (the stream is incomplete); ``[DONE]`` last."""
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    root: str | None = None


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class UpstreamHealth(BaseModel):
    url: str
    healthy: bool
    in_flight: int
    waiting: float
    running: float
    last_error: str | None


class HealthResponse(BaseModel):
    """``/health``: 200 with ``status: ok`` while an upstream is healthy, else 503 ``unavailable``."""

    status: Literal["ok", "unavailable"]
    upstreams: list[UpstreamHealth]
    load_pressure: float


class AppliedPolicy(BaseModel):
    """What the ``X-VLMPrune-Applied`` response header reports, as ``key=value; ...``."""

    method: str
    ratio: float
    visual_tokens: int
    """Prunable visual tokens in the request (LLaVA-NeXT newline tokens excluded)."""
    kept: int
    policy: str
    """The named policy at the base of the precedence stack."""
    source: str
    """Where the ratio came from: policy, adaptive, body or header."""
    stages: str = ""
    """In-LLM methods (the in-LLM route): the visual tokens each stage inside the LLM kept, all
    images, as ``after_layer:kept,...`` (``kept`` is then what enters the LLM); empty otherwise."""
    route: str = ""
    """How the engine serves the method: ``in_llm``, ``probe`` or ``pre_llm``
    (:func:`vlmprune.methods.served_route`); empty at ratio 0 or without the served model's config."""
    fallback: str = ""
    """The errors (class names, comma-separated) of the scorer failures the engine served with its
    evenly spaced fallback selection (:mod:`vlmprune.vllm_plugin.fallback`); empty when none."""

    def header(self) -> str:
        out = (
            f"method={self.method}; ratio={self.ratio:g}; visual_tokens={self.visual_tokens}; kept={self.kept}; "
            f"policy={self.policy}; source={self.source}"
        )
        out += f"; route={self.route}" if self.route else ""
        out += f"; stages={self.stages}" if self.stages else ""
        return out + (f"; fallback={self.fallback}" if self.fallback else "")

    @classmethod
    def parse(cls, value: str) -> AppliedPolicy:
        fields = dict(part.strip().split("=", 1) for part in value.split(";") if part.strip())
        return cls.model_validate(fields)
