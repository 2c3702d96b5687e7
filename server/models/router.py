"""``GET /v1/models`` from the first upstream that answers (they all serve the same model)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.auth import require_api_key
from server.chat.protocol import ModelList
from server.errors import ERROR_RESPONSES, GatewayError

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_api_key)],
            responses={200: {"model": ModelList, "description": "The served model(s)"}, **ERROR_RESPONSES})
async def list_models(request: Request) -> Response:
    state = request.app.state.gateway
    failures = []
    for up in state.pool.ordered():
        try:
            resp = await state.client.get(up.url + "/v1/models", headers=state.pool.auth_headers)
        except httpx.HTTPError as exc:
            state.pool.mark_failed(up, f"{type(exc).__name__}: {exc}")
            failures.append(f"{up.url}: {type(exc).__name__}")
            continue
        if resp.status_code >= 500:
            failures.append(f"{up.url}: HTTP {resp.status_code}")
            continue
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))
    raise GatewayError(503, f"no upstream answered /v1/models ({'; '.join(failures)})")
