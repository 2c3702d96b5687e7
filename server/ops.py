"""``GET /health`` (200 while at least one upstream is healthy, else 503) and ``GET /metrics``.

Both are open (no API key), as Kubernetes probes and Prometheus scrapers expect.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.chat.protocol import HealthResponse

router = APIRouter()


@router.get("/health", responses={
    200: {"model": HealthResponse, "description": "At least one upstream is healthy"},
    503: {"model": HealthResponse, "description": "No upstream is healthy"},
})
async def health(request: Request) -> JSONResponse:
    state = request.app.state.gateway
    ups = [
        {"url": up.url, "healthy": up.healthy, "in_flight": up.in_flight, "waiting": up.load.waiting,
         "running": up.load.running, "last_error": up.last_error}
        for up in state.pool.upstreams
    ]
    ok = state.pool.any_healthy()
    return JSONResponse({"status": "ok" if ok else "unavailable", "upstreams": ups,
                         "load_pressure": state.adapter.pressure}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "The gateway's metrics in Prometheus' text format"}})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)
