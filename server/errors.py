"""OpenAI's error shape (``{"error": {"message", "type", "param", "code"}}``) for every failure.

vLLM answers in the same shape (``code`` = the HTTP status), so a client sees one format whether
the gateway or the upstream refused the request. Nothing here ever returns a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

# OpenAI's error ``type`` per status, as its API and the official client use them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int
    """The HTTP status, as vLLM sets it."""


class ErrorResponse(BaseModel):
    """Body of every non-2xx answer (listed in the routes' ``responses=`` for the OpenAPI schema)."""

    error: ErrorInfo


class GatewayError(Exception):
    """A request the gateway refuses or cannot serve; becomes an :class:`ErrorResponse`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, type=self.type)


def error_body(status: int, message: str, *, param: str | None = None, type: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=message, type=type or _TYPES.get(status, "server_error"), param=param, code=status)
    return ErrorResponse(error=info).model_dump()


def sse_error_event(status: int, message: str, *, type: str | None = None) -> bytes:
    """The event vLLM itself sends when a stream fails (the official client raises ``APIError``)."""
    return b"data: " + json.dumps(error_body(status, message, type=type)).encode() + b"\n\ndata: [DONE]\n\n"


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (400, "invalid request: bad header, policy, image or body"),
        (401, "missing or wrong API key"),
        (413, "request body too large"),
        (431, "request headers too large (max_header_bytes)"),
        (502, "every upstream failed before answering (a 5xx, garbage, a dropped connection)"),
        (503, "no upstream could be reached"),
        (504, "no upstream began its answer within request_timeout_s"),
    )
}
