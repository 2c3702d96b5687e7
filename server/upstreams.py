"""The vLLM upstreams: health, load read from vLLM's own /metrics, least-loaded choice.

A background task polls every upstream's ``/health`` and ``/metrics`` (``vllm:num_requests_waiting``,
``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``). A request goes to the healthy
upstream with the lowest load (its queue and running requests as vLLM reports them, or this
gateway's own in-flight count to it when that is higher, which is fresher); ties rotate. An
upstream that fails a request is marked unhealthy until its next successful health check.

``dns+http://name:port`` stands for every address ``name`` resolves to, re-resolved at each poll:
with a Kubernetes headless Service in front of a vLLM Deployment, every pod becomes its own
upstream (so least-loaded routing sees each engine) and replicas come and go without a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
TTFT = "vllm:time_to_first_token_seconds"

STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError)
"""What ``send`` raises, before any response byte, when the upstream closed the kept-alive
connection the request went out on (vLLM's server closes idle ones after a few seconds; a request
reusing one at that moment gets "Server disconnected without sending a response")."""


async def send_resending_if_stale(client: httpx.AsyncClient, build: Callable[[], httpx.Request], *,
                                  stream: bool = False, on_resend: Callable[[], None] | None = None) -> httpx.Response:
    """``client.send(build())``, sent once more, on a connection of its own, when the first try
    fails before any response byte as on a connection the server had closed. An upstream that is
    really down fails the second try too (and is then marked failed by the caller); one closed
    kept-alive connection must not cost a request (seen as a 502 in a 15-minute soak)."""
    try:
        return await client.send(build(), stream=stream)
    except STALE_CONNECTION_ERRORS as exc:
        logger.info("upstream closed the connection before answering (%s: %s); sending once more",
                    type(exc).__name__, exc)
        if on_resend is not None:
            on_resend()
        return await client.send(build(), stream=stream)


@dataclass
class VLLMLoad:
    """One scrape of an upstream's /metrics (summed over its engines and models)."""

    waiting: float = 0.0
    running: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0


def parse_vllm_metrics(text: str) -> VLLMLoad:
    """The load figures from a Prometheus text exposition (missing metrics count as 0)."""
    load = VLLMLoad()
    for family in text_string_to_metric_families(text):
        if family.name == WAITING:
            load.waiting += sum(s.value for s in family.samples)
        elif family.name == RUNNING:
            load.running += sum(s.value for s in family.samples)
        elif family.name == TTFT:
            for s in family.samples:
                if s.name == TTFT + "_sum":
                    load.ttft_sum += s.value
                elif s.name == TTFT + "_count":
                    load.ttft_count += s.value
    return load


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    in_flight: int = 0
    """Requests this gateway has open on it right now."""
    load: VLLMLoad = field(default_factory=VLLMLoad)
    ttft_recent_s: float | None = None
    """Mean TTFT of the requests that got their first token since the previous scrape."""
    last_error: str | None = None
    checked_at: float = 0.0

    @property
    def score(self) -> float:
        return max(float(self.in_flight), self.load.running + self.load.waiting) + self.load.waiting

    def record(self, load: VLLMLoad) -> None:
        d_count = load.ttft_count - self.load.ttft_count
        d_sum = load.ttft_sum - self.load.ttft_sum
        self.ttft_recent_s = d_sum / d_count if d_count > 0 and d_sum >= 0 else None
        self.load = load


class UpstreamPool:
    """The upstream list, kept fresh by :meth:`run` (an asyncio task started by the app)."""

    def __init__(self, urls: list[str], client: httpx.AsyncClient, *, health_timeout_s: float = 5.0,
                 auth_headers: dict[str, str] | None = None) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self.dns_sources = [u.removeprefix("dns+") for u in urls if u.startswith("dns+")]
        self.static = [u for u in urls if not u.startswith("dns+")]
        self.upstreams = [Upstream(url) for url in self.static]
        self.client = client
        self.health_timeout_s = health_timeout_s
        self.auth_headers = auth_headers or {}
        self._rotation = itertools.count()

    async def check(self, up: Upstream) -> None:
        """One health check and metrics scrape; never raises."""
        try:
            resp = await self._get(up.url + "/health")
            if resp.status_code != 200:
                raise RuntimeError(f"/health answered {resp.status_code}")
            metrics = await self._get(up.url + "/metrics")
            if metrics.status_code == 200:
                up.record(parse_vllm_metrics(metrics.text))
            up.healthy, up.last_error = True, None
        except Exception as exc:  # connection refused, timeouts, bad metrics text: all mean "unhealthy"
            if up.healthy:
                logger.warning("upstream %s unhealthy: %s", up.url, exc)
            up.healthy, up.last_error = False, f"{type(exc).__name__}: {exc}"
        up.checked_at = time.monotonic()

    async def _get(self, url: str) -> httpx.Response:
        build = lambda: self.client.build_request("GET", url, timeout=self.health_timeout_s,  # noqa: E731
                                                  headers=self.auth_headers)
        return await send_resending_if_stale(self.client, build)  # not streamed: the body is read

    async def resolve(self) -> None:
        """Expand the ``dns+`` sources into one upstream per address (kept across polls)."""
        if not self.dns_sources:
            return
        loop = asyncio.get_running_loop()
        wanted = list(self.static)
        for source in self.dns_sources:
            parts = urlsplit(source)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("cannot resolve upstream %s: %s", source, exc)
                infos = []
            for info in infos:
                host = info[4][0]
                host = f"[{host}]" if ":" in host else host
                url = f"{parts.scheme}://{host}:{port}"
                if url not in wanted:
                    wanted.append(url)
        known = {up.url: up for up in self.upstreams}
        self.upstreams = [known.get(url) or Upstream(url) for url in wanted]

    async def check_all(self) -> None:
        await self.resolve()
        await asyncio.gather(*(self.check(up) for up in self.upstreams))

    async def run(self, interval_s: float, on_update=None) -> None:
        """Poll forever (cancelled at shutdown); ``on_update(pool)`` after every round."""
        while True:
            await self.check_all()
            if on_update is not None:
                on_update(self)
            await asyncio.sleep(interval_s)

    def ordered(self) -> list[Upstream]:
        """Healthy upstreams, least loaded first (ties rotate); then the unhealthy ones as a last
        resort, since a health check can lag behind a recovered server."""
        turn = next(self._rotation)
        n = max(1, len(self.upstreams))
        indexed = list(enumerate(self.upstreams))
        key = lambda iu: (not iu[1].healthy, iu[1].score, (iu[0] - turn) % n)  # noqa: E731
        return [up for _, up in sorted(indexed, key=key)]

    def any_healthy(self) -> bool:
        return any(up.healthy for up in self.upstreams)

    def mark_failed(self, up: Upstream, reason: str) -> None:
        logger.warning("upstream %s failed: %s", up.url, reason)
        up.healthy, up.last_error = False, reason

    def fleet_load(self) -> tuple[float, float | None]:
        """(waiting requests per healthy upstream, mean recent TTFT over them or None)."""
        healthy = [up for up in self.upstreams if up.healthy]
        if not healthy:
            return 0.0, None
        waiting = sum(up.load.waiting for up in healthy) / len(healthy)
        ttfts = [up.ttft_recent_s for up in healthy if up.ttft_recent_s is not None]
        return waiting, (sum(ttfts) / len(ttfts) if ttfts else None)
