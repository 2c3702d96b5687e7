"""``create_app(settings)``: the FastAPI gateway, wired from typed settings.

Per resource a router (HTTP) and a serving object (logic), as in vLLM's OpenAI server:
``server.chat`` (chat completions), ``server.models`` (/v1/models), ``server.ops`` (/health,
/metrics), ``server.playground`` (the /playground page and its /v1/vlmprune/ routes). Every error leaves as OpenAI's error JSON; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.chat.router import OPENAPI_SCHEMAS as CHAT_SCHEMAS
from server.chat.router import router as chat_router
from server.chat.serving import ChatServing
from server.config import GatewaySettings
from server.errors import GatewayError, error_body
from server.metrics import GatewayMetrics
from server.model_info import ServedModel
from server.models.router import router as models_router
from server.ops import router as ops_router
from server.playground.router import router as playground_router
from server.playground.router import static_files as playground_static
from server.playground.serving import Overlays, RunStore
from server.policies import HEADER_POLICY, LoadAdapter, load_policies
from server.upstreams import UpstreamPool

logger = logging.getLogger("vlmprune.gateway")


class GatewayState:
    """Everything a request handler needs; one per app."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.policies = load_policies(settings.policies_file)
        self.metrics = GatewayMetrics()
        a = settings.adaptive
        self.adapter = LoadAdapter(a.queue_target, a.ttft_target_s, a.step, a.low_water)
        self.model: ServedModel | None = ServedModel(settings.model_dir) if settings.model_dir else None
        self.client: httpx.AsyncClient | None = None
        self.pool: UpstreamPool | None = None
        self.chat = ChatServing(self)
        self.runs = RunStore()
        """Finished playground (traced) runs, for ``/v1/vlmprune/traces/{id}``."""
        self._overlays: Overlays | None = None
        self._model_lock = asyncio.Lock()
        self._publish_policy_ratios()

    def start(self) -> None:
        s = self.settings
        timeout = httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        auth = {"authorization": f"Bearer {s.upstream_api_key}"} if s.upstream_api_key else {}
        self.pool = UpstreamPool(s.upstreams, self.client, health_timeout_s=s.connect_timeout_s, auth_headers=auth)

    def on_poll(self, pool: UpstreamPool) -> None:
        """After every upstream poll: move the load pressure and publish the gauges."""
        waiting, ttft = pool.fleet_load()
        self.adapter.update(waiting, ttft)
        self.metrics.pressure.set(self.adapter.pressure)
        self._publish_policy_ratios()
        for up in pool.upstreams:
            self.metrics.upstream_healthy.labels(up.url).set(1.0 if up.healthy else 0.0)
            self.metrics.upstream_in_flight.labels(up.url).set(up.in_flight)

    def _publish_policy_ratios(self) -> None:
        for name, named in self.policies.policies.items():
            self.metrics.policy_ratio.labels(name).set(named.ratio_at(self.adapter.pressure))

    def overlays(self) -> Overlays:
        """Placement of traced kept tokens on images; needs the served model (known after a run)."""
        if self._overlays is None:
            self._overlays = Overlays(self.model)
        return self._overlays

    async def served_model(self, required: bool = True) -> ServedModel | None:
        """The served model's geometry; discovered from an upstream's /v1/models ``root`` (a local
        directory) when ``model_dir`` is not set. 503 when it is needed and cannot be found."""
        if self.model is not None or not required:
            return self.model
        async with self._model_lock:
            if self.model is None:
                self.model = await self._discover_model()
        return self.model

    async def _discover_model(self) -> ServedModel:
        roots = []
        for up in self.pool.ordered():
            try:
                resp = await self.client.get(up.url + "/v1/models", headers=self.pool.auth_headers)
                data = resp.json().get("data") or []
            except Exception as exc:  # unreachable upstream or a non-vLLM answer: try the next one
                logger.info("model discovery from %s failed: %s", up.url, exc)
                continue
            for entry in data:
                root = entry.get("root") or entry.get("id")
                roots.append(root)
                if root and (Path(root) / "config.json").is_file():
                    logger.info("served model directory (from %s/v1/models): %s", up.url, root)
                    return await asyncio.to_thread(ServedModel, root)
        raise GatewayError(
            503, "the served model's directory is unknown to the gateway (upstreams report "
            f"{roots or 'nothing'}); set model_dir (VLMPRUNE_MODEL_DIR) to a copy of it",
        )


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI):
    state: GatewayState = app.state.gateway
    state.start()
    await state.pool.check_all()
    state.on_poll(state.pool)
    poller = asyncio.create_task(state.pool.run(state.settings.health_interval_s, state.on_poll))
    try:
        yield
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await state.client.aclose()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(400, f"invalid request: {first.get('msg', exc)}", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, f"internal gateway error ({type(exc).__name__})"), status_code=500)


class HeaderLimit:
    """ASGI middleware: a request whose headers exceed ``limit`` bytes is answered 431 in OpenAI's
    shape before any route runs (uvicorn's httptools parser accepts headers of any size, and h11's
    own bound answers a plain-text 400)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > self.limit:
                message = (f"request headers are {size} bytes, over the limit of {self.limit} "
                           "(max_header_bytes); send long values in the body")
                await JSONResponse(error_body(431, message), status_code=431)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app. Settings come from the argument or from ``VLMPRUNE_*`` variables."""
    settings = settings or GatewaySettings()
    if not settings.upstreams:
        raise ValueError("no upstreams: set upstreams (VLMPRUNE_UPSTREAMS) to the vLLM server URLs")
    app = FastAPI(title="vlmprune gateway", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible gateway that applies per-request visual-token compression.")
    app.state.gateway = GatewayState(settings)
    _install_error_handlers(app)
    app.add_middleware(HeaderLimit, limit=settings.max_header_bytes)
    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(ops_router)
    app.include_router(playground_router)
    app.mount("/playground/static", playground_static, name="playground-static")
    _complete_openapi(app, list(app.state.gateway.policies.policies))
    return app


def _complete_openapi(app: FastAPI, policy_names: list[str]) -> None:
    """Add what only the app knows to its (cached, served) OpenAPI document: the chat request's
    models and this gateway's named policies as the values of ``X-VLMPrune-Policy``."""
    document = app.openapi()
    document["components"]["schemas"].update(CHAT_SCHEMAS)
    for param in document["paths"]["/v1/chat/completions"]["post"]["parameters"]:
        if param["name"] == HEADER_POLICY:
            param["schema"] = {"type": "string", "enum": policy_names}
