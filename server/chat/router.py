"""HTTP route of the chat resource; the work is in :mod:`server.chat.serving`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.auth import require_api_key
from server.chat.protocol import ChatCompletionRequest
from server.errors import ERROR_RESPONSES

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
        }
    },
    summary="OpenAI chat completions, with the vlmprune policy taken from X-VLMPrune-* headers",
)
async def create_chat_completion(request: Request) -> Response:
    # The raw body is read by the serving layer itself, to enforce the size limit while reading.
    return await request.app.state.gateway.chat.handle(request)
