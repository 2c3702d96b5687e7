"""A small real HTTP server standing in for a vLLM upstream (not a mock of the gateway's code).

Running a second ``vllm serve`` on the 2-core test machines would double the engine cost of the
module, so the upstream that fails, saturates or dies mid-stream is this server: it speaks the
parts of vLLM's HTTP API the gateway uses (``/health``, ``/metrics`` with vLLM's metric names,
``/v1/models``, ``/v1/chat/completions`` streaming and not), records the bodies it receives, and
misbehaves on demand (``mode``): ``ok``, ``error500``, ``die_mid_stream`` (drops the connection
after two chunks), ``unhealthy`` (``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeUpstream:
    def __init__(self, model_root: str = "fake-model", mode: str = "ok") -> None:
        self.mode = mode
        self.model_root = model_root
        self.waiting = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.bodies: list[dict] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/health", self._health),
            Route("/metrics", self._metrics),
            Route("/v1/models", self._models),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> FakeUpstream:
        self._thread.start()
        deadline = time.time() + 10
        while not self._server.started:
            if time.time() > deadline:
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    async def _health(self, request: Request):
        return PlainTextResponse("", status_code=503 if self.mode == "unhealthy" else 200)

    async def _metrics(self, request: Request):
        text = (
            "# HELP vllm:num_requests_waiting Number of requests waiting.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="fake"}} {self.waiting}\n'
            "# HELP vllm:num_requests_running Number of requests running.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{engine="0",model_name="fake"} 0.0\n'
            "# HELP vllm:time_to_first_token_seconds TTFT.\n"
            "# TYPE vllm:time_to_first_token_seconds histogram\n"
            f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="fake"}} {self.ttft_count}\n'
            f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="fake"}} {self.ttft_count}\n'
            f'vllm:time_to_first_token_seconds_sum{{engine="0",model_name="fake"}} {self.ttft_sum}\n'
        )
        return PlainTextResponse(text)

    async def _models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model", "root": self.model_root}]})

    async def _chat(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "error500":
            return JSONResponse({"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
                                status_code=500)
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
        if not body.get("stream"):
            return JSONResponse({
                "id": "fake-1", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake answer"},
                             "finish_reason": "stop"}],
                "usage": usage,
            })

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            event = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            yield chunk({"content": "fake"})
            if self.mode == "die_mid_stream":
                await asyncio.sleep(0.05)
                raise ConnectionResetError("fake upstream killed mid-stream")
            for word in (" answer", " here"):
                yield chunk({"content": word})
            yield chunk({}, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
