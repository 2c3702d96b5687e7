"""HTTP route of the chat resource; the work is in :mod:`server.chat.serving`.

The OpenAPI document lists the request body and the answers from :mod:`server.chat.protocol` and
the ``X-VLMPrune-*`` headers as parameters. The headers are documented here rather than declared
as FastAPI parameters because the serving layer parses them itself, with errors that name them.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic.json_schema import models_json_schema

from server.auth import require_api_key
from server.chat.protocol import ChatCompletionRequest, ChatCompletionResponse, StreamEvent
from server.errors import ERROR_RESPONSES
from server.policies import HEADER_APPLIED, HEADER_METHOD, HEADER_POLICY, HEADER_RATIO
from vlmprune.methods import METHODS

router = APIRouter()

OPENAPI_SCHEMAS = models_json_schema([(ChatCompletionRequest, "validation")],
                                     ref_template="#/components/schemas/{model}")[1]["$defs"]
"""The request's models, for the app to add to the document's ``components`` (the request body is
read by the serving layer, so FastAPI does not register them itself)."""

_POLICY_HEADERS = [
    {"name": HEADER_POLICY, "in": "header", "required": False,
     "description": "Named policy from the gateway's policies file (built-in: quality, balanced, fast); the "
                    "app lists its own names here.",
     "schema": {"type": "string", "minLength": 1}},
    {"name": HEADER_METHOD, "in": "header", "required": False,
     "description": "Compression method; overrides the named policy's and the body's.",
     "schema": {"type": "string", "enum": sorted(METHODS)}},
    {"name": HEADER_RATIO, "in": "header", "required": False,
     "description": "Fraction of visual tokens removed, in [0, 1), bucketed to steps of 0.005.",
     "schema": {"type": "string", "pattern": r"^(0(\.[0-9]{1,4})?|\.[0-9]{1,4})$"}},
]
_APPLIED_HEADER = {
    HEADER_APPLIED: {
        "description": "The policy the request ran under: method=...; ratio=...; visual_tokens=...; kept=...; "
                       "policy=...; source=... (``none`` for a request refused before one was resolved).",
        "schema": {"type": "string"},
    }
}
_ANSWERS = {
    200: {
        "description": "The answer: a chat.completion, or with stream=true an SSE stream of chat.completion.chunk "
                       "events ending in data: [DONE]",
        "headers": _APPLIED_HEADER,
        "model": ChatCompletionResponse,
        "content": {"text/event-stream": {"schema": StreamEvent.model_json_schema()}},
    },
    **ERROR_RESPONSES,
}


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(require_api_key)],
    responses=_ANSWERS,
    openapi_extra={
        "parameters": _POLICY_HEADERS,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        },
    },
    summary="OpenAI chat completions, with the vlmprune policy taken from X-VLMPrune-* headers",
)
async def create_chat_completion(request: Request) -> Response:
    # The raw body is read by the serving layer itself, to enforce the size limit while reading.
    return await request.app.state.gateway.chat.handle(request)
