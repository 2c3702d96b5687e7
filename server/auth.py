"""Optional Bearer API keys, checked at the gateway (401 in OpenAI's error shape)."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import GatewayError


async def require_api_key(request: Request) -> None:
    keys: list[str] = request.app.state.gateway.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise GatewayError(401, "missing API key: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})
    if not any(hmac.compare_digest(token.strip().encode(), key.encode()) for key in keys):
        raise GatewayError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
