"""HTTP routes of the playground: the page (``/playground``, static, open like any web page) and
its API under ``/v1/vlmprune/`` (the API's own key, when keys are on).

The page itself is plain HTML + JS + CSS from ``server/playground/static`` (package data, no build
step); every answer it shows comes from the public API: ``/v1/chat/completions`` with
``X-VLMPrune-*`` headers, plus the three routes here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from server.auth import require_api_key
from server.errors import ERROR_RESPONSES
from server.playground.protocol import DemoScene, MethodsResponse, TraceResponse
from server.playground.serving import demo_scene, methods_for, trace_of

STATIC = Path(__file__).with_name("static")

router = APIRouter()
static_files = StaticFiles(directory=STATIC)
"""Mounted at ``/playground/static`` by :func:`server.app.create_app`."""


@router.get("/playground", include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/v1/vlmprune/methods", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES,
            response_model=MethodsResponse, summary="Methods the served model supports, named policies, ratio grid")
async def list_methods(request: Request) -> MethodsResponse:
    state = request.app.state.gateway
    return methods_for(state, await state.served_model())


@router.get("/v1/vlmprune/demo-scene", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES,
            response_model=DemoScene, summary="A testbed scene with its question and expected answer")
async def get_demo_scene(request: Request, index: int | None = Query(None, ge=0)) -> DemoScene:
    return demo_scene(await request.app.state.gateway.served_model(), index)


@router.get("/v1/vlmprune/traces/{trace_id}", dependencies=[Depends(require_api_key)],
            responses={**ERROR_RESPONSES, 404: ERROR_RESPONSES[400] | {"description": "no such finished run"}},
            response_model=TraceResponse, summary="A finished traced run: kept tokens, stages, cost")
async def get_trace(request: Request, trace_id: str) -> TraceResponse:
    return await trace_of(request.app.state.gateway, trace_id)
