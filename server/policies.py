"""Named policies, header parsing, precedence and the load-adaptive ratio.

Precedence, lowest to highest (each layer overrides the fields it sets):

1. the named policy: ``X-VLMPrune-Policy`` if sent, else the server default;
2. the body's ``mm_processor_kwargs.vlmprune`` (method, ratio, options, instruction);
3. the ``X-VLMPrune-Method`` / ``X-VLMPrune-Ratio`` headers.

Headers win over the body because they are the gateway's own interface and can be set by a proxy
or an API-management layer in front of unchanged clients; the body wins over the named policy
because it is the more specific request. When a layer changes the method, the options of the
lower layers (which belong to the old method) are dropped; the ratio carries over.

Load-adaptive ratios: a named policy may give ``max_ratio``. When (and only when) the ratio came
from the named policy, it is ``ratio + pressure * (max_ratio - ratio)``, bucketed, where
``pressure`` in [0, 1] rises while the upstreams are saturated and falls when load is low
(:class:`LoadAdapter`). A ratio the client chose explicitly is never changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.validation import shorten
from vlmprune.methods import METHODS, require_support
from vlmprune.policy import PolicyError, PolicyT, bucket_ratio, parse_policy
from vlmprune.trace import check_trace_id
from vlmprune.wire import INSTRUCTION_KEY, request_value

HEADER_POLICY = "X-VLMPrune-Policy"
HEADER_METHOD = "X-VLMPrune-Method"
HEADER_RATIO = "X-VLMPrune-Ratio"
HEADER_APPLIED = "X-VLMPrune-Applied"
HEADER_TRACE = "X-VLMPrune-Trace"
"""Optional trace id: the engine records the kept token indices (:mod:`vlmprune.trace`)."""


class NamedPolicy(BaseModel):
    """One entry of the policies file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    method: str
    ratio: float = Field(ge=0.0, lt=1.0)
    """The ratio under normal load."""
    max_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    """Load-adaptive upper bound: the ratio rises toward it while the upstreams are saturated."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The method's own options (see ``vlmprune methods --json``)."""

    @model_validator(mode="after")
    def _check(self) -> NamedPolicy:
        if self.max_ratio is not None and self.max_ratio < self.ratio:
            raise ValueError(f"max_ratio ({self.max_ratio}) must be >= ratio ({self.ratio})")
        parse_policy({"method": self.method, "ratio": self.ratio, **self.options})  # raises PolicyError
        return self

    @property
    def adaptive(self) -> bool:
        return self.max_ratio is not None and self.max_ratio > self.ratio

    def ratio_at(self, pressure: float) -> float:
        """The ratio under ``pressure`` (0 = normal load, 1 = saturated), on the policy grid."""
        if not self.adaptive:
            return self.ratio
        return bucket_ratio(self.ratio + min(1.0, max(0.0, pressure)) * (self.max_ratio - self.ratio))


class PoliciesConfig(BaseModel):
    """The policies file: ``default`` names the policy used when a request names none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str
    policies: dict[str, NamedPolicy]

    @model_validator(mode="after")
    def _default_exists(self) -> PoliciesConfig:
        if self.default not in self.policies:
            raise ValueError(f"default policy {self.default!r} is not one of: {', '.join(self.policies)}")
        return self


BUILTIN_POLICIES = PoliciesConfig(
    default="balanced",
    policies={
        "quality": NamedPolicy(method="fastervlm", ratio=0.5),
        "balanced": NamedPolicy(method="fastervlm", ratio=0.75, max_ratio=0.9),
        "fast": NamedPolicy(method="fastervlm", ratio=0.9, max_ratio=0.95),
    },
)


def load_policies(path: str | Path | None) -> PoliciesConfig:
    """Read a YAML/JSON policies file (``None`` = the built-in set); errors name the file."""
    if path is None:
        return BUILTIN_POLICIES
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"policies file {str(path)!r}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        return PoliciesConfig.model_validate(data)
    except (ValueError, ValidationError) as exc:  # PolicyError and JSON/YAML errors are ValueErrors
        raise ValueError(f"policies file {str(path)!r}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise ValueError(f"policies file {str(path)!r}: not valid YAML ({exc})") from None


@dataclass(frozen=True)
class ResolvedPolicy:
    """The policy a request runs under, and where its parts came from (for the applied header)."""

    policy: PolicyT
    name: str
    """The named policy at the bottom of the precedence stack."""
    ratio_source: str
    """``policy``, ``adaptive``, ``body`` or ``header``."""
    instruction: str | None = None
    trace: str | None = None
    """``X-VLMPrune-Trace``: forwarded to the engine as the policy's ``trace`` entry."""

    @property
    def method(self) -> str:
        return self.policy.method

    @property
    def ratio(self) -> float:
        return self.policy.ratio

    def processor_kwargs(self) -> dict[str, Any]:
        """The ``mm_processor_kwargs[POLICY_KEY]`` value the plugin reads (:mod:`vlmprune.wire`)."""
        return request_value(self.policy, self.instruction, self.trace)


def needs_instruction(method: str, family: str | None) -> bool:
    """Instruction-aware methods score with the user's text; pre-LLM ones must not receive it (it
    would enter the multimodal hash and defeat the processor cache across prompts), nor do methods
    the in-LLM route runs between the decoder layers (they read the prompt's own instruction rows)."""
    from vlmprune.methods import served_in_llm

    return METHODS[method].probe and not (family is not None and served_in_llm(method, family))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise PolicyError(f"header {name} is empty")
    return value


def parse_ratio_header(value: str) -> float:
    """``X-VLMPrune-Ratio``: a finite number in [0, 1)."""
    try:
        ratio = float(value)
    except ValueError:
        raise PolicyError(f"header {HEADER_RATIO}: {shorten(value)} is not a number (expected e.g. 0.75)") from None
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise PolicyError(f"header {HEADER_RATIO}: ratio must be in [0, 1), got {shorten(value)}")
    return ratio


def _switch_method(data: dict[str, Any], method: Any) -> dict[str, Any]:
    if method == data.get("method"):
        return data
    return {"method": method, "ratio": data["ratio"]}


def resolve_policy(
    headers: Mapping[str, str],
    body_policy: Mapping[str, Any] | None,
    config: PoliciesConfig,
    family: str | None,
    *,
    pressure: float = 0.0,
    instruction: str | None = None,
) -> ResolvedPolicy:
    """Apply the precedence rules (module docstring); raise :class:`PolicyError` naming the
    header or field at fault. ``instruction`` is the text the gateway extracted from the chat; it
    is attached only for instruction-aware methods and only when the body gave none."""
    # 1. Named policy.
    name = _header(headers, HEADER_POLICY) or config.default
    named = config.policies.get(name)
    if named is None:
        raise PolicyError(f"header {HEADER_POLICY}: unknown policy {shorten(name)}; known policies: "
                          f"{', '.join(config.policies)}")
    data: dict[str, Any] = {"method": named.method, "ratio": named.ratio, **named.options}
    ratio_source = "policy"
    # 2. Body.
    body_instruction = None
    if body_policy is not None:
        if not isinstance(body_policy, Mapping):
            raise PolicyError("body field mm_processor_kwargs.vlmprune must be an object")
        body = dict(body_policy)
        body_instruction = body.pop(INSTRUCTION_KEY, None)
        if body_instruction is not None and not isinstance(body_instruction, str):
            raise PolicyError("body field mm_processor_kwargs.vlmprune.instruction must be a string")
        if "method" in body:
            data = _switch_method(data, body["method"])
        data.update(body)
        if "ratio" in body:
            ratio_source = "body"
    # 3. Headers.
    method = _header(headers, HEADER_METHOD)
    if method is not None:
        if method not in METHODS:
            raise PolicyError(f"header {HEADER_METHOD}: unknown method {shorten(method)}; known methods: "
                              f"{', '.join(METHODS)}")
        data = _switch_method(data, method)
    ratio_text = _header(headers, HEADER_RATIO)
    if ratio_text is not None:
        data["ratio"] = parse_ratio_header(ratio_text)
        ratio_source = "header"
    # 4. Load-adaptive ratio, only for a ratio taken from the named policy.
    if ratio_source == "policy" and named.adaptive:
        data["ratio"] = named.ratio_at(pressure)
        ratio_source = "adaptive"
    policy = parse_policy(data)
    if family is not None:  # None: a text-only request, nothing to check the method against
        require_support(policy.method, family)
    trace = _header(headers, HEADER_TRACE)
    if trace is not None:
        try:
            check_trace_id(trace, f"header {HEADER_TRACE}")
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
    text = body_instruction if body_instruction is not None else instruction
    return ResolvedPolicy(
        policy=policy, name=name, ratio_source=ratio_source,
        instruction=(text or "") if needs_instruction(policy.method, family) else None, trace=trace,
    )


class LoadAdapter:
    """Pressure in [0, 1] from the upstreams' queue depth and TTFT, with hysteresis.

    Each :meth:`update` (once per ``interval_s``): saturated (waiting per upstream >= queue_target
    or recent mean TTFT >= ttft_target) -> pressure + step; calm (both below ``low_water`` times
    their target) -> pressure - step; in between -> unchanged. A missing TTFT (no request finished
    its first token in the interval) counts as calm on that signal.
    """

    def __init__(self, queue_target: float, ttft_target_s: float, step: float = 0.25, low_water: float = 0.5):
        self.queue_target = queue_target
        self.ttft_target_s = ttft_target_s
        self.step = step
        self.low_water = low_water
        self.pressure = 0.0

    def load(self, waiting_per_upstream: float, ttft_s: float | None) -> float:
        """Load as a fraction of the targets (>= 1: saturated)."""
        queue = waiting_per_upstream / self.queue_target
        ttft = (ttft_s or 0.0) / self.ttft_target_s
        return max(queue, ttft)

    def update(self, waiting_per_upstream: float, ttft_s: float | None) -> float:
        load = self.load(waiting_per_upstream, ttft_s)
        if load >= 1.0:
            self.pressure = min(1.0, self.pressure + self.step)
        elif load < self.low_water:
            self.pressure = max(0.0, self.pressure - self.step)
        return self.pressure
