"""Chat completions: validate, resolve the policy, count tokens, forward, stream back, measure.

One request, step by step:
1. read the body (413 past ``max_body_bytes``), parse it and validate it against
   :class:`ChatCompletionRequest` (400 with one sentence naming the field, :mod:`server.validation`);
2. find the images, decode and measure them (400 for corrupt data, too many, remote URLs off or
   refused by :mod:`server.remote_images`);
3. resolve the policy from headers, body and named policy (:mod:`server.policies`; 400 naming
   the header or field), check the method fits the served model's family;
4. write it into ``mm_processor_kwargs.vlmprune`` and count visual tokens in / kept;
5. forward to the least-loaded healthy upstream; a connection error, a timeout, a 5xx or garbage
   before any byte reached the client is retried on the next upstream (503 / 504 / 502 when none
   is left, :func:`failure_status`);
6. pass the answer through unchanged (streams chunk by chunk) with ``X-VLMPrune-Applied``; a
   stream whose upstream dies or falls silent (``stream_idle_timeout_s``) ends with an OpenAI
   error event; metrics are recorded at the end.

A client that leaves is noticed at once, not at the next write to it: a task listens for its
``http.disconnect`` from the moment the body is read (:func:`_client_left`, then
:class:`RelayResponse` during a stream), and the work under way is cancelled, which closes the
upstream request, so vLLM aborts it (its OpenAI server aborts a request whose client left, in
both modes). This holds for a non-streaming request waiting on a long completion too; it ends as
a 499 (nginx's code for a client that left) in the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pydantic import ValidationError

from server.chat.protocol import AppliedPolicy, ChatCompletionRequest
from server.errors import GatewayError, sse_error_event
from server.images import DecodedImage, check_image_bytes, decode_data_url, iter_image_parts
from server.remote_images import fetch_remote
from server.validation import shorten, summarize
from server.playground.serving import Run
from server.policies import HEADER_APPLIED, ResolvedPolicy, resolve_policy
from server.model_info import RequestCost
from server.upstreams import Upstream, send_resending_if_stale
from vlmprune.geometry import ImageTokenCounts
from vlmprune.methods import served_route
from vlmprune.policy import PolicyError
from vlmprune.trace import TRACE_KEY, pop_fallback_reports
from vlmprune.wire import POLICY_KEY

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    payload: bytes
    stream: bool
    resolved: ResolvedPolicy | None
    images: list[ImageTokenCounts] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    """Prunable tokens kept per image (the served model's rule, :meth:`ServedModel.kept`)."""
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) per image, for the playground's overlay."""
    stages: list[list[tuple[int, int]]] = field(default_factory=list)
    """Per image, ``(after_layer, kept)`` of each in-LLM stage (:attr:`vlmprune.reduction.plan.ImagePlan.stages`)."""
    route: str = ""
    """How the engine serves the policy (:func:`vlmprune.methods.served_route`); empty without a model."""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Sent upstream as ``X-Request-Id``: vLLM's request id starts with ``chatcmpl-<it>``, which names
    the request's fallback report (:func:`vlmprune.trace.pop_fallback_reports`)."""
    fallback: str = ""
    """Error class names of the engine's fallbacks for this request, once read."""

    @property
    def trace(self) -> str | None:
        return self.resolved.trace if self.resolved is not None and self.images else None

    @property
    def method_label(self) -> str:
        return self.resolved.method if self.resolved is not None and self.images else "none"

    def applied(self) -> AppliedPolicy | None:
        if self.resolved is None:
            return None
        return AppliedPolicy(
            method=self.resolved.method, ratio=self.resolved.ratio,
            visual_tokens=sum(t.prunable for t in self.images),
            kept=sum(self.kept),
            policy=self.resolved.name, source=self.resolved.ratio_source,
            stages=",".join(f"{layer}:{kept}" for layer, kept in _summed_stages(self.stages)),
            route=self.route if self.resolved.ratio > 0 else "",
            fallback=self.fallback,
        )


def _summed_stages(per_image: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """``(after_layer, kept over all images)``; every image of a request has the same stage layers."""
    out: dict[int, int] = {}
    for stages in per_image:
        for layer, kept in stages:
            out[layer] = out.get(layer, 0) + kept
    return sorted(out.items())


def instruction_text(messages: list[dict[str, Any]]) -> str:
    """The user text that follows the last image: the text parts after it in its message and in
    later user messages; if there is none (the question came first), all text of that message."""
    last_msg = last_part = None
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    last_msg, last_part = i, j
    if last_msg is None:
        return ""

    def texts(parts: Any) -> list[str]:
        if isinstance(parts, str):
            return [parts]
        return [p.get("text", "") for p in parts or [] if isinstance(p, dict) and p.get("type") == "text"]

    content = messages[last_msg]["content"]
    after = texts(content[last_part + 1:])
    after += [t for m in messages[last_msg + 1:] if m.get("role") == "user" for t in texts(m.get("content"))]
    chosen = [t for t in after if t.strip()] or [t for t in texts(content) if t.strip()]
    return " ".join(t.strip() for t in chosen)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(raw: bytes) -> Any:
    """The JSON body; NaN and Infinity (which Python's parser accepts) are refused, as JSON does."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}") from None
    except UnicodeDecodeError:
        raise GatewayError(400, "request body is not UTF-8 text") from None
    except RecursionError:
        raise GatewayError(400, "request body is nested too deeply") from None
    except ValueError as exc:  # NaN / Infinity, or an integer with thousands of digits
        raise GatewayError(400, f"request body is not valid JSON: {exc}") from None


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(413, f"request body is {length} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _StreamObserver:
    """Reads a copy of the SSE stream for the first content token and the usage chunk."""

    def __init__(self) -> None:
        self.buffer = b""
        self.first_token_at: float | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("usage"):
                self.usage = event["usage"]
            if self.first_token_at is None:
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or choice.get("finish_reason"):
                        self.first_token_at = time.perf_counter()
                        break


class ChatServing:
    """State shared by all chat requests of one app (settings, pool, policies, metrics, model)."""

    def __init__(self, app_state: Any) -> None:
        self.state = app_state

    # -- 1-4: prepare ------------------------------------------------------------------------

    async def prepare(self, raw: bytes, headers: Any) -> Prepared:
        s = self.state.settings
        body = parse_body(raw)
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            message, param = summarize(exc, body)
            raise GatewayError(400, f"invalid request: {message}", param=param) from None
        stream = request.stream
        mm_kwargs = request.mm_processor_kwargs
        messages = body["messages"]

        parts = list(iter_image_parts(messages))
        if len(parts) > s.max_images:
            raise GatewayError(400, f"{len(parts)} images in the request, over the limit of {s.max_images}",
                               param="messages")
        sizes = []
        for part in parts:
            image = await self._load_image(part["image_url"]["url"])
            if image.data_url != part["image_url"]["url"]:
                part["image_url"] = {**part["image_url"], "url": image.data_url}
            sizes.append((image.width, image.height))

        body_policy = (mm_kwargs or {}).get(POLICY_KEY)
        model = await self.state.served_model(required=bool(parts))
        family = model.family if model is not None else None
        try:
            resolved = resolve_policy(
                headers, body_policy, self.state.policies, family,
                pressure=self.state.adapter.pressure,
                instruction=instruction_text(messages) if parts else None,
            )
        except PolicyError as exc:
            raise GatewayError(400, str(exc), param=POLICY_KEY) from None
        images, kept, stages = [], [], []
        if parts and model is not None:
            try:
                images = [model.image_tokens(w, h) for w, h in sizes]
            except ValueError as exc:
                raise GatewayError(400, f"image cannot be served: {exc}", param="messages") from None
            plans = [model.plan(resolved.policy, t) for t in images]
            kept = [p.entering for p in plans]
            stages = [list(p.stages) for p in plans]  # empty but on the in-LLM route
            vlmprune = resolved.processor_kwargs()
            if s.trace_dir is None:  # the engines would refuse it; the run still gets its costs
                vlmprune.pop(TRACE_KEY, None)
            body["mm_processor_kwargs"] = {**(mm_kwargs or {}), POLICY_KEY: vlmprune}
        route = served_route(resolved.method, family) if family is not None else ""
        return Prepared(payload=json.dumps(body).encode(), stream=stream, resolved=resolved, images=images,
                        kept=kept, sizes=sizes, stages=stages, route=route)

    async def _load_image(self, url: str) -> DecodedImage:
        s = self.state.settings
        if url.startswith("data:"):
            return decode_data_url(url, s.max_image_pixels)
        if url.startswith(("http://", "https://")):
            if not s.allow_remote_images:
                raise GatewayError(400, "remote image URLs are disabled on this gateway; send the image as a "
                                   "data URL (data:image/png;base64,...)", param="messages")
            raw = await fetch_remote(url, self.state.client, s)
            return check_image_bytes(raw, s.max_image_pixels)
        raise GatewayError(400, f"image URL {shorten(url)} is neither a data URL nor http(s)", param="messages")

    # -- 5: forward --------------------------------------------------------------------------

    def _headers(self, prep: Prepared) -> dict[str, str]:
        # identity: streams are relayed as raw bytes, so they must not arrive compressed
        h = {"content-type": "application/json", "accept-encoding": "identity", "x-request-id": prep.request_id}
        if self.state.settings.upstream_api_key:
            h["authorization"] = f"Bearer {self.state.settings.upstream_api_key}"
        return h

    async def _open(self, prep: Prepared) -> tuple[Upstream, httpx.Response, bytes, AsyncIterator[bytes] | None]:
        """The first upstream that answers something relayable: below 500, a JSON body or an event
        stream that has sent its first chunk. Failures before that are retried on the next one."""
        pool, client, metrics = self.state.pool, self.state.client, self.state.metrics
        failures: list[tuple[int, str]] = []
        for attempt, up in enumerate(pool.ordered()):
            if attempt:
                metrics.retries.inc()
            self._track(up, +1)
            resp = None
            opened = False
            try:
                build = lambda up=up: client.build_request("POST", up.url + "/v1/chat/completions",  # noqa: E731
                                                           content=prep.payload, headers=self._headers(prep))
                resp = await send_resending_if_stale(client, build, stream=True, on_resend=metrics.resends.inc)
                if resp.status_code >= 500:
                    detail = (await resp.aread())[:200].decode(errors="replace")
                    raise UpstreamAnswerError(f"HTTP {resp.status_code}: {detail}")
                rest = None
                if prep.stream and resp.status_code == 200:
                    rest = resp.aiter_raw()
                    first = await _first_event(resp, rest)
                else:
                    first = await resp.aread()
                    _require_json_object(resp.status_code, first)
                opened = True
                return up, resp, first, rest
            except Exception as exc:  # connection errors, timeouts, 5xx, garbage: try the next upstream
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                pool.mark_failed(up, reason)
                failures.append((failure_status(exc), f"{up.url}: {reason}"))
            finally:  # also when cancelled (the client left): no retry, the request is closed (vLLM aborts it)
                if not opened:
                    self._track(up, -1)
                    if resp is not None:
                        await resp.aclose()
        if not failures:
            raise GatewayError(503, "no upstream configured")
        statuses = {status for status, _ in failures}
        detail = "; ".join(reason for _, reason in failures)
        if 502 in statuses:
            raise GatewayError(502, f"every upstream failed before answering ({detail})")
        if 504 in statuses:
            timeout_s = self.state.settings.request_timeout_s
            raise GatewayError(504, f"no upstream began its answer within request_timeout_s = {timeout_s:g} s "
                               f"({detail})")
        raise GatewayError(503, f"no upstream could be reached ({detail})")

    def _read_fallbacks(self, prep: Prepared) -> None:
        """Whether the engine served this request's images with its fallback selection (a scorer
        failed in the worker): read from the report the plugin writes in the trace folder, which the
        engine shares with the gateway (``vlmprune serve`` always gives it one)."""
        folder = self.state.settings.trace_dir
        if folder is None or not prep.images or prep.resolved is None or prep.resolved.ratio <= 0:
            return
        failures = pop_fallback_reports(Path(folder), f"chatcmpl-{prep.request_id}")
        if not failures:
            return
        errors = [str(f.get("error", "")) for f in failures]
        prep.fallback = ",".join(dict.fromkeys(e.split(":", 1)[0] or "error" for e in errors))
        self.state.metrics.fallbacks.labels(prep.method_label).inc()
        logger.warning("request %s (%s) was served with the engine's fallback selection: %s", prep.request_id,
                       prep.method_label, "; ".join(errors))

    def _track(self, up: Upstream, delta: int) -> None:
        """This gateway's open requests on ``up`` (routing uses it; the gauge shows it live)."""
        up.in_flight += delta
        self.state.metrics.upstream_in_flight.labels(up.url).set(up.in_flight)

    # -- 6: respond and measure -----------------------------------------------------------------

    def _record(self, prep: Prepared, status: int, started: float, usage: dict[str, Any] | None,
                first_token_at: float | None) -> None:
        m = self.state.metrics
        label = prep.method_label
        m.requests.labels(label, str(status)).inc()
        m.latency.labels(label).observe(time.perf_counter() - started)
        if first_token_at is not None:
            m.ttft.labels(label).observe(first_token_at - started)
        served = status == 200 and prep.images and prep.resolved is not None
        cost = self._account(prep, usage) if served else None
        if prep.trace is not None:  # a playground run: its outcome for /v1/vlmprune/traces/{id}
            self.state.runs.add(prep.trace, Run.finished(prep, status, self.state.model.family, cost))

    def _account(self, prep: Prepared, usage: dict[str, Any] | None) -> RequestCost | None:
        """Visual-token and FLOPs counters of a served request; its cost (None if it failed)."""
        m = self.state.metrics
        placeholders = sum(prep.kept) + sum(t.newline for t in prep.images)
        prompt = (usage or {}).get("prompt_tokens")
        n_text = prompt - placeholders if isinstance(prompt, int) else 0  # unknown (stream without usage): 0
        n_instr = len((prep.resolved.instruction or "").split())
        try:
            cost = self.state.model.cost(prep.images, prep.resolved.policy, n_text, n_instr)
        except Exception:  # accounting must never break serving
            logger.exception("FLOPs accounting failed")
            return None
        m.visual_tokens.labels("input").inc(cost.visual_in)
        m.visual_tokens.labels("kept").inc(cost.visual_kept)
        m.prefill_flops.labels("baseline").inc(cost.baseline_flops)
        m.prefill_flops.labels("actual").inc(cost.actual_flops)
        return cost

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        metrics = self.state.metrics
        metrics.in_flight.inc()
        handed_off = False
        prep: Prepared | None = None
        try:
            try:
                raw = await read_body(request, self.state.settings.max_body_bytes)
            except ClientDisconnect:  # gone while sending its body: nothing was started
                metrics.requests.labels("none", "499").inc()
                return Response(status_code=499)
            prepared: list[Prepared] = []  # set as soon as known, for the 499's method label
            opened = await _unless_client_leaves(request.receive, self._prepare_and_open(raw, request.headers,
                                                                                          prepared))
            if opened is None:  # the client left; what was under way upstream is closed
                if prepared:
                    self._record(prepared[0], 499, started, None, None)
                else:
                    metrics.requests.labels("none", "499").inc()
                return Response(status_code=499)
            prep, (up, resp, first, rest) = prepared[0], opened
            if resp.status_code == 200:  # the engine's prefill is done once its first bytes are here
                self._read_fallbacks(prep)
            applied = prep.applied()
            headers = {HEADER_APPLIED: applied.header()} if applied is not None else {}
            media = resp.headers.get("content-type", "application/json")
            if not (prep.stream and resp.status_code == 200):
                await resp.aclose()
                self._track(up, -1)
                usage = None
                if resp.status_code == 200:
                    try:
                        usage = json.loads(first).get("usage")
                    except (ValueError, AttributeError):
                        usage = None
                self._record(prep, resp.status_code, started, usage, None)
                return Response(first, status_code=resp.status_code, media_type=media, headers=headers)
            handed_off = True
            return RelayResponse(self._relay(prep, up, resp, first, rest, started), status_code=200,
                                 media_type=media, headers=headers)
        except GatewayError as exc:
            label = prep.method_label if prep is not None else "invalid"
            metrics.requests.labels(label, str(exc.status)).inc()
            applied = prep.applied() if prep is not None else None
            exc.headers.setdefault(HEADER_APPLIED, applied.header() if applied is not None else "none")
            raise
        finally:
            if not handed_off:
                metrics.in_flight.dec()

    async def _prepare_and_open(self, raw: bytes, headers: Any, prepared: list[Prepared]
                                ) -> tuple[Upstream, httpx.Response, bytes, AsyncIterator[bytes] | None]:
        prep = await self.prepare(raw, headers)
        prepared.append(prep)
        return await self._open(prep)

    async def _relay(self, prep: Prepared, up: Upstream, resp: httpx.Response, first: bytes,
                     rest: AsyncIterator[bytes], started: float) -> AsyncIterator[bytes]:
        observer = _StreamObserver()
        status = 200
        idle_s = self.state.settings.stream_idle_timeout_s
        try:
            observer.feed(first)
            yield first
            while True:
                try:
                    async with asyncio.timeout(idle_s):
                        chunk = await anext(rest)
                except StopAsyncIteration:
                    break
                observer.feed(chunk)
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away (nginx's code for it); closing resp aborts it upstream
            raise
        except Exception as exc:  # the upstream died or fell silent mid-stream: end with an error event
            status = failure_status(exc)
            self.state.pool.mark_failed(up, f"mid-stream {type(exc).__name__}: {exc}")
            if status == 504:
                message = (f"upstream sent nothing for stream_idle_timeout_s = {idle_s:g} s during the stream; "
                           "the answer is incomplete, retry the request")
            else:
                message = (f"upstream failed during the stream ({type(exc).__name__}); "
                           "the answer is incomplete, retry the request")
            yield sse_error_event(status, message)
        finally:
            await resp.aclose()
            self._track(up, -1)
            self.state.metrics.in_flight.dec()
            self._record(prep, status, started, observer.usage, observer.first_token_at)


class UpstreamAnswerError(Exception):
    """The upstream answered, but with nothing the gateway can relay (a 5xx, a body that is not
    JSON, a stream that is not an event stream)."""


def failure_status(exc: BaseException) -> int:
    """The status an upstream failure becomes: 503 unreachable, 504 too slow, 502 a bad answer
    (5xx, garbage, a connection dropped after the request was sent)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return 503
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return 504
    return 502


async def _first_event(resp: httpx.Response, rest: AsyncIterator[bytes]) -> bytes:
    """A stream's first non-empty chunk, checked to be the start of an event stream."""
    media = resp.headers.get("content-type", "")
    if not media.startswith("text/event-stream"):
        raise UpstreamAnswerError(f"HTTP 200 stream with content-type {media or 'none'!r}, not text/event-stream")
    first = b""
    while not first:  # skip empty reads; StopAsyncIteration = closed before a byte
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            raise UpstreamAnswerError("stream closed before its first byte") from None
    if not first.lstrip().startswith((b"data:", b":", b"event:", b"id:", b"retry:")):
        raise UpstreamAnswerError(f"stream does not begin with a server-sent event: {first[:60]!r}")
    return first


def _require_json_object(status: int, body: bytes) -> None:
    """vLLM answers JSON objects (a completion or an OpenAI error); anything else is garbage."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise UpstreamAnswerError(f"HTTP {status} with a body that is not a JSON object: {body[:60]!r}")


async def _client_left(receive: Receive) -> None:
    """Returns when the client has gone (``http.disconnect``). Only called once the body has been
    read, so no request message is lost; the server keeps the disconnect, so cancelling this and
    listening again later (:class:`RelayResponse`) misses nothing."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(receive: Receive, work: Any) -> Any:
    """The result of the coroutine ``work``, or None if the client leaves first; ``work`` is then
    cancelled (and awaited), so whatever it had open upstream is closed before this returns."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_left(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


class RelayResponse(StreamingResponse):
    """A stream that stops the moment its client leaves, on every ASGI server: a listener for
    ``http.disconnect`` runs beside the sending (Starlette listens only for ASGI < 2.4 and relies
    on a failing send otherwise), a send that fails because the client is gone counts as leaving,
    and the body iterator is always closed at the end, so :meth:`ChatServing._relay` closes the
    upstream request at once (vLLM aborts it) and records its metrics, even when the client left
    while a send was waiting on a slow reader (where Starlette would abandon the iterator)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sending = asyncio.ensure_future(self._send_all(send))
        watcher = asyncio.ensure_future(_client_left(receive))
        try:
            await asyncio.wait({sending, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            watcher.cancel()
            try:
                await asyncio.gather(sending, watcher, return_exceptions=True)
            finally:
                await self.body_iterator.aclose()  # type: ignore[union-attr]  # our async generator
        if not sending.cancelled() and sending.exception() is not None:
            raise sending.exception()

    async def _send_all(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # the client is gone (ASGI >= 2.4 servers raise it from send)
            pass
