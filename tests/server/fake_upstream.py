"""A small real HTTP server standing in for a vLLM upstream (not a mock of the gateway's code).

Running a second ``vllm serve`` on the 2-core test machines would double the engine cost of the
module, so the upstream that fails, saturates or dies mid-stream is this server: it speaks the
parts of vLLM's HTTP API the gateway uses (``/health``, ``/metrics`` with vLLM's metric names,
``/v1/models``, ``/v1/chat/completions`` streaming and not), records the bodies it receives, and
misbehaves on demand (``mode``): ``ok``, ``error500``, ``die_mid_stream`` (drops the connection
after two chunks), ``unhealthy`` (``/health`` answers 503), ``hang`` (never answers a chat
request), ``hang_mid_stream`` (two chunks, then silence), ``garbage`` (200 with an HTML body or a
plain-text "stream"), ``slow`` (answers after ``delay_s``), ``long`` (a completion that takes
``delay_s``: a stream of a chunk every 20 ms, or one answer at the end; like vLLM, it abandons a
request whose client leaves, counted in ``fake:aborted_total``, and counts the ones it finished
in ``fake:completed_total``), ``fallback`` (answers as ``ok`` after writing the fallback report the
plugin's worker writes when a scorer fails, into ``$VLMPRUNE_TRACE_DIR``, for the engine request id
vLLM derives from ``X-Request-Id``).

The fault tests need a process they can kill or hang, so ``python -m tests.server.fake_upstream
--port P --mode M`` runs the same server as a process of its own (:class:`FakeUpstreamProcess`),
``--mode not_http`` runs a TCP server that answers every connection with bytes that are not
HTTP, and ``--mode close_kept_alive`` one that closes each kept-alive connection when it is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from vlmprune.trace import TRACE_DIR_ENV, write_fallback_report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeUpstream:
    def __init__(self, model_root: str = "fake-model", mode: str = "ok", port: int | None = None,
                 delay_s: float = 1.0) -> None:
        self.mode = mode
        self.model_root = model_root
        self.delay_s = delay_s
        self.running = 0
        """Chat requests being answered right now (reported as ``vllm:num_requests_running``)."""
        self.waiting = 0.0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.bodies: list[dict] = []
        self.aborted = 0
        self.completed = 0
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[
            Route("/health", self._health),
            Route("/metrics", self._metrics),
            Route("/v1/models", self._models),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
        ])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical",
                                                   timeout_graceful_shutdown=1))
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
            f'vllm:num_requests_running{{engine="0",model_name="fake"}} {self.running}\n'
            f"fake:aborted_total {self.aborted}\n"
            f"fake:completed_total {self.completed}\n"
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
        if self.mode == "fallback":  # as the plugin's worker does when a scorer fails for an image
            folder = Path(os.environ[TRACE_DIR_ENV])
            engine_id = f"chatcmpl-{request.headers['x-request-id']}-0badc0de"
            write_fallback_report(folder, engine_id, "image-hash", {"method": "fastervlm", "family": "llava",
                                  "error": "NonFiniteScoresError: the scores hold NaN"})
        if self.mode == "long":
            return await self._long(request, body)
        self.running += 1
        try:
            return await self._answer(body)
        finally:
            self.running -= 1

    async def _long(self, request: Request, body: dict):
        """A completion that lasts ``delay_s`` and stops when its client leaves, as vLLM's does
        (``with_cancellation`` for an answer, Starlette's disconnect listener for a stream)."""
        self.running += 1
        ended = False

        def end(aborted: bool) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.running -= 1
                if aborted:
                    self.aborted += 1
                else:
                    self.completed += 1

        if body.get("stream"):
            async def events():
                try:
                    deadline = time.monotonic() + self.delay_s
                    while time.monotonic() < deadline:
                        event = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                                 "choices": [{"index": 0, "delta": {"content": " word"}, "finish_reason": None}]}
                        yield b"data: " + json.dumps(event).encode() + b"\n\n"
                        await asyncio.sleep(0.02)
                    yield b"data: [DONE]\n\n"
                    end(aborted=False)
                finally:
                    end(aborted=True)

            return StreamingResponse(events(), media_type="text/event-stream")

        async def client_left() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        answer = asyncio.ensure_future(asyncio.sleep(self.delay_s))
        watcher = asyncio.ensure_future(client_left())
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finished = answer.done()
        answer.cancel()
        watcher.cancel()
        end(aborted=not finished)
        return JSONResponse({
            "id": "fake-1", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a long answer"},
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110},
        })

    async def _answer(self, body: dict):
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "slow":
            await asyncio.sleep(self.delay_s)
        if self.mode == "garbage":
            if body.get("stream"):
                return PlainTextResponse("this is not an event stream\n")
            return PlainTextResponse("<html><body>502 Bad Gateway</body></html>", media_type="text/html")
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
            if self.mode == "hang_mid_stream":
                await asyncio.sleep(3600)
            for word in (" answer", " here"):
                yield chunk({"content": word})
            yield chunk({}, "stop")
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


async def _serve_not_http(port: int) -> None:
    """Answers every connection with bytes that are not an HTTP response, then closes it."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"\x00\x01 SSH-2.0-not-http \xff\xfe\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


async def _serve_closing_kept_alive(port: int, model_root: str) -> None:
    """HTTP/1.1 by hand: every connection answers its first request (``/health``, ``/metrics``,
    ``/v1/models``, a chat completion, streamed or not) with ``Connection: keep-alive``, then closes
    without a word when the client sends a second request on it: the race of a server closing an
    idle connection just as the client reuses it, made certain (uvicorn cannot be made to do it)."""
    async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return lines[0].split(" ")[1], json.loads(body) if body else {}

    def answer(path: str, body: dict) -> tuple[str, bytes]:
        if path == "/v1/models":
            return "application/json", json.dumps({"object": "list", "data": [{"id": "fake", "root": model_root}]}).encode()
        if path != "/v1/chat/completions":
            return "text/plain", b""
        if not body.get("stream"):
            return "application/json", json.dumps({
                "id": "fake-1", "object": "chat.completion", "created": 0, "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "fake answer"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}).encode()
        chunk = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                 "choices": [{"index": 0, "delta": {"content": "fake answer"}, "finish_reason": "stop"}]}
        return "text/event-stream", f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path, body = await read_request(reader)
            media, payload = answer(path, body)
            writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: {media}\r\ncontent-length: {len(payload)}\r\n"
                         "connection: keep-alive\r\n\r\n".encode() + payload)
            await writer.drain()
            await read_request(reader)  # the reuse: closed unanswered
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


class FakeUpstreamProcess:
    """The fake upstream as a process of its own, for the tests that kill or hang an upstream."""

    def __init__(self, mode: str = "ok", model_root: str = "fake-model", delay_s: float = 1.0) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tests.server.fake_upstream", "--port", str(self.port), "--mode", mode,
               "--model-root", model_root, "--delay-s", str(delay_s)]
        repo = Path(__file__).resolve().parents[2]
        self.proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})

    def __enter__(self) -> FakeUpstreamProcess:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake upstream process ({self.mode}) did not start") from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.stop()

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its connections drop without a goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A fake vLLM upstream that misbehaves on demand.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="ok")
    p.add_argument("--model-root", default="fake-model")
    p.add_argument("--delay-s", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.mode == "not_http":
        asyncio.run(_serve_not_http(args.port))
        return
    if args.mode == "close_kept_alive":
        asyncio.run(_serve_closing_kept_alive(args.port, args.model_root))
        return
    up = FakeUpstream(model_root=args.model_root, mode=args.mode, port=args.port, delay_s=args.delay_s)
    up._server.run()


if __name__ == "__main__":
    main()
