"""Gateway settings: typed, validated once at start-up, from arguments or ``VLMPRUNE_*`` variables.

Environment variables use the field names (``VLMPRUNE_UPSTREAMS='["http://vllm:8000"]'``,
``VLMPRUNE_API_KEYS='["k1"]'``, ``VLMPRUNE_ADAPTIVE__QUEUE_TARGET=8``), so the same settings drive
``vlmprune serve``, the container image and the Kubernetes manifests.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class AdaptiveSettings(BaseModel):
    """When to raise a load-adaptive policy's ratio (read from the upstreams' own /metrics)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    queue_target: float = Field(4.0, gt=0.0)
    """``vllm:num_requests_waiting`` per healthy upstream at which the fleet counts as saturated."""
    ttft_target_s: float = Field(2.0, gt=0.0)
    """Mean ``vllm:time_to_first_token_seconds`` over the last interval at which it is saturated."""
    step: float = Field(0.25, gt=0.0, le=1.0)
    """Pressure change per poll (``health_interval_s``); pressure 0 = the policy's ratio, 1 = its
    max_ratio."""
    low_water: float = Field(0.5, ge=0.0, lt=1.0)
    """Pressure falls only when load is below this fraction of both targets (hysteresis)."""


class GatewaySettings(BaseSettings):
    """Everything the gateway needs; nothing is read from disk or network before ``create_app``."""

    model_config = SettingsConfigDict(
        env_prefix="VLMPRUNE_", env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    upstreams: list[str] = Field(default_factory=list)
    """Base URLs of ``vllm serve`` processes with the vlmprune plugin (``http://host:port``);
    ``dns+http://name:port`` = one upstream per address of ``name`` (a headless Service)."""
    upstream_api_key: str | None = None
    """Sent as ``Authorization: Bearer`` to the upstreams when they run with ``--api-key``."""
    model_dir: str | None = None
    """Directory of the served model (for visual-token counts and FLOPs); default: the ``root``
    that the upstream's /v1/models reports, when it is a directory this process can read."""
    policies_file: str | None = None
    """YAML or JSON file of named policies; default: the built-in quality / balanced / fast."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted ``Authorization: Bearer`` keys; empty = no authentication."""
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(32 * 1024, gt=0)
    """All request headers together (``name: value`` lines, as sent); more is a 431 in OpenAI's
    shape. uvicorn's default HTTP parser (httptools) has no bound of its own, so this is the one a
    client meets (a proxy in front may set a lower one: nginx's ``large_client_header_buffers``)."""
    max_images: int = Field(8, ge=1)
    """Images per request; more is a 400 (keep it <= vLLM's --limit-mm-per-prompt)."""
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    allow_remote_images: bool = False
    """Fetch http(s) image URLs at the gateway (and forward them as data URLs); off by default.
    Loopback, private, link-local (cloud metadata), multicast and reserved addresses are refused
    after DNS resolution and after every redirect (``server.remote_images``)."""
    remote_image_allowed_hosts: list[str] = Field(default_factory=list)
    """Host names remote images may come from (exact, or ``*.example.com``); empty = any public host."""
    remote_image_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list)
    """Non-public addresses that may still be fetched, listed explicitly (``["127.0.0.1/32"]`` for
    an image server on this machine, ``["10.1.2.0/24"]`` for an internal one)."""
    remote_image_max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    remote_image_timeout_s: float = Field(10.0, gt=0.0)
    """Whole fetch of one image: DNS, connections, redirects and body."""
    remote_image_max_redirects: int = Field(3, ge=0)
    connect_timeout_s: float = Field(5.0, gt=0.0)
    """Longest wait for a TCP connection to an upstream (and for its /health, /metrics answers);
    past it the upstream counts as unreachable and the next one is tried."""
    request_timeout_s: float = Field(600.0, gt=0.0)
    """Longest wait for an upstream's answer to begin: the whole non-streaming answer, or a
    stream's first chunk (vLLM sends it with the first token). Past it the next upstream is tried;
    504 when none answered in time."""
    stream_idle_timeout_s: float = Field(60.0, gt=0.0)
    """Longest silence between two chunks of a stream that has begun; past it the stream ends with
    a 504 error event and the upstream request is closed (vLLM then aborts it)."""
    trace_dir: str | None = None
    """Folder the vLLM engines write kept-token traces to (their own ``VLMPRUNE_TRACE_DIR``: the
    same variable when both run on one host); the playground's overlay reads them. None = the
    playground shows answers and costs without the overlay. ``vlmprune serve`` sets both."""
    health_interval_s: float = Field(1.0, gt=0.0)
    """How often every upstream's /health and /metrics are read (and the load pressure updated)."""
    adaptive: AdaptiveSettings = Field(default_factory=AdaptiveSettings)

    @field_validator("upstreams")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        out = []
        for url in value:
            if not url.removeprefix("dns+").startswith(("http://", "https://")):
                raise ValueError(f"upstream URL must start with http://, https:// or dns+http://, got {url!r}")
            out.append(url.rstrip("/"))
        if len(set(out)) != len(out):
            raise ValueError(f"upstream URLs must be distinct, got {value}")
        return out
