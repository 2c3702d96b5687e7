"""The policy on the wire: its key, its mapping form and its byte form, for the gateway and the plugin.

A request's policy changes form on its way to the engine's stages; each form is written and read
here only:

1. the gateway (or any client) puts :func:`request_value` under ``mm_processor_kwargs[POLICY_KEY]``:
   the policy's options plus the optional ``instruction`` text and ``trace`` id;
2. vLLM's processor validates it once per request (:func:`parse_request`, after vLLM's merge over
   the engine default) and attaches :func:`policy_bytes` to each image as a tensor field;
3. the worker and the scheduler read that field back with :func:`policy_from_bytes`, which parses a
   given payload once per process (a batch's images and a request's steps share the parsed policy).

Torch-free, so the gateway imports it without loading the plugin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vlmprune.policy import PolicyError, PolicyT, parse_policy
from vlmprune.trace import TRACE_KEY, check_trace_id

POLICY_KEY = "vlmprune"
"""Key of the policy inside ``mm_processor_kwargs``."""
INSTRUCTION_KEY = "instruction"
"""Optional entry of the policy mapping: the request's instruction text (not a policy option)."""
__all__ = ["INSTRUCTION_KEY", "POLICY_KEY", "TRACE_KEY", "RequestPolicy", "parse_request", "policy_bytes",
           "policy_from_bytes", "request_value"]


@dataclass(frozen=True)
class RequestPolicy:
    """A request's validated policy (``None``: no pruning) and its optional instruction text."""

    policy: PolicyT | None = None
    instruction: str | None = None
    trace: str | None = None
    """Trace id (:mod:`vlmprune.trace`): record the kept token indices of this request."""

    @property
    def active(self) -> bool:
        """Whether any token may be removed (ratio 0 and no policy are the stock path)."""
        return self.policy is not None and self.policy.ratio > 0.0


def request_value(policy: PolicyT, instruction: str | None = None, trace: str | None = None) -> dict[str, Any]:
    """The ``mm_processor_kwargs[POLICY_KEY]`` value for ``policy`` (what :func:`parse_request` reads)."""
    out = policy.model_dump()
    if instruction is not None:
        out[INSTRUCTION_KEY] = instruction
    if trace is not None:
        out[TRACE_KEY] = trace
    return out


def parse_request(raw: Any) -> RequestPolicy:
    """Validate the value of ``mm_processor_kwargs[POLICY_KEY]`` (already merged over the default).

    ``None`` (or absent) means no pruning. Raises :class:`PolicyError` naming the field and value.
    A JSON-able value is validated once per distinct value in this process (vLLM's processor reads
    a request's policy more than once; the result is frozen, so it is shared safely).
    """
    if raw is None or isinstance(raw, str):
        return _parse_text(raw)
    try:
        text = json.dumps(raw, sort_keys=True)
    except (TypeError, ValueError):  # not JSON-able: validated as is (and refused if it is not a mapping)
        return _parse_value(raw)
    return _parse_text(text)


@lru_cache(maxsize=1024)
def _parse_text(text: str | None) -> RequestPolicy:
    if text is None:
        return RequestPolicy()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        # An engine default given on the command line arrives as a JSON string.
        raise PolicyError(f"mm_processor_kwargs[{POLICY_KEY!r}] must be a mapping, got {text!r}") from None
    return _parse_value(value)


def _parse_value(raw: Any) -> RequestPolicy:
    if raw is None:
        return RequestPolicy()
    if not isinstance(raw, Mapping):
        raise PolicyError(f"mm_processor_kwargs[{POLICY_KEY!r}] must be a mapping, got {type(raw).__name__}")
    data = dict(raw)
    instruction = data.pop(INSTRUCTION_KEY, None)
    if instruction is not None and not isinstance(instruction, str):
        raise PolicyError(f"field {INSTRUCTION_KEY!r}: must be a string (got {instruction!r})")
    trace_id = data.pop(TRACE_KEY, None)
    if trace_id is not None:
        try:
            check_trace_id(trace_id)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
    return RequestPolicy(policy=parse_policy(data), instruction=instruction, trace=trace_id)


def policy_bytes(policy: PolicyT | None) -> bytes:
    """The validated policy as UTF-8 JSON (sorted keys; ``b""`` = no policy): the per-image field."""
    return b"" if policy is None else json.dumps(policy.model_dump(), sort_keys=True).encode()


@lru_cache(maxsize=1024)
def policy_from_bytes(raw: bytes) -> PolicyT | None:
    """The policy of a :func:`policy_bytes` payload, parsed once per distinct payload in this process
    (policies are frozen, so the cached object is shared safely)."""
    return parse_policy(json.loads(raw)) if raw else None
