"""Schemas of the chat resource, for validation of the fields the gateway reads and for OpenAPI.

The gateway forwards the body to vLLM unchanged except for ``mm_processor_kwargs.vlmprune`` (and
remote image URLs, replaced by data URLs when remote images are allowed); every other field is
vLLM's to validate, so the models here allow extra fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ChatCompletionRequest(BaseModel):
    """The fields the gateway looks at; all others pass through to vLLM."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    """OpenAI chat messages; images as ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""
    stream: bool = False
    mm_processor_kwargs: dict[str, Any] | None = None
    """``{"vlmprune": {"method", "ratio", ...options, "instruction"}}`` (headers override it)."""


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

    def header(self) -> str:
        return (
            f"method={self.method}; ratio={self.ratio:g}; visual_tokens={self.visual_tokens}; kept={self.kept}; "
            f"policy={self.policy}; source={self.source}"
        )

    @classmethod
    def parse(cls, value: str) -> AppliedPolicy:
        fields = dict(part.strip().split("=", 1) for part in value.split(";") if part.strip())
        return cls.model_validate(fields)
