"""Upstream faults: the real gateway in front of upstream processes that hang or answer garbage.

vLLM cannot be made to hang or to answer a 500 or garbage on demand, so the broken upstream here
is the fake upstream (tests/server/fake_upstream.py) run as a process of its own; every answer the
client gets comes from the real gateway over real HTTP. The faults a real ``vllm serve`` can
produce (killed mid-stream, a client that goes away, one of several upstreams killed) are in
test_faults_vllm.py.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from server.config import GatewaySettings
from tests.server.conftest import image_message, metric_samples, metric_sum, running_gateway
from tests.server.fake_upstream import FakeUpstreamProcess

CHAT = "/v1/chat/completions"


def settings(model_dir, upstreams, **kw) -> GatewaySettings:
    return GatewaySettings(upstreams=upstreams, model_dir=str(model_dir), **{"health_interval_s": 0.2, **kw})


def post(url: str, stream: bool, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(url + CHAT, json={"model": "fake", "messages": image_message(), "stream": stream},
                      timeout=timeout)


def assert_openai_error(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert needle in error["message"], error["message"]


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def upstream_in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("vlmprune_upstream_in_flight{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vlmprune_upstream_in_flight sample")


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_that_hangs_is_a_504_after_request_timeout(tiny_llava_dir, stream):
    """An upstream that takes the request and never answers: 504 once request_timeout_s (1 s here)
    has passed, in OpenAI's shape; the gateway keeps answering /health meanwhile."""
    with FakeUpstreamProcess("hang", str(tiny_llava_dir)) as hung, \
            running_gateway(settings(tiny_llava_dir, [hung.url], request_timeout_s=1.0)) as url:
        t0 = time.monotonic()
        r = post(url, stream)
        elapsed = time.monotonic() - t0
        assert_openai_error(r, 504, "request_timeout_s = 1 s")
        assert r.json()["error"]["type"] == "upstream_error" and "ReadTimeout" in r.json()["error"]["message"]
        assert 1.0 <= elapsed < 10.0, elapsed
        assert httpx.get(url + "/health", timeout=5).status_code in (200, 503)
        assert upstream_in_flight(url) == 0


def test_hung_upstream_is_skipped_for_a_working_one(tiny_llava_dir):
    """[hung, working]: every request is answered (the hung one after its timeout, by the other)."""
    with FakeUpstreamProcess("hang", str(tiny_llava_dir)) as hung, \
            FakeUpstreamProcess("ok", str(tiny_llava_dir)) as good, \
            running_gateway(settings(tiny_llava_dir, [hung.url, good.url], request_timeout_s=3.0)) as url:
        for stream in (False, True, False, True):
            r = post(url, stream)
            assert r.status_code == 200, r.text[:300]
            assert "fake answer" in r.text or "here" in r.text


def test_stream_that_falls_silent_ends_with_a_504_event(tiny_llava_dir):
    """Two chunks, then silence: after stream_idle_timeout_s the client gets the chunks, an OpenAI
    error event (code 504) and [DONE]; the official client raises APIError; nothing stays open."""
    with FakeUpstreamProcess("hang_mid_stream", str(tiny_llava_dir)) as silent, \
            running_gateway(settings(tiny_llava_dir, [silent.url], stream_idle_timeout_s=1.0)) as url:
        t0 = time.monotonic()
        r = post(url, stream=True)
        assert r.status_code == 200 and 1.0 <= time.monotonic() - t0 < 10.0
        events = sse_events(r.text)
        assert events[1]["choices"][0]["delta"]["content"] == "fake"
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504
        assert "stream_idle_timeout_s = 1 s" in events[-2]["error"]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="stream_idle_timeout_s"):
            list(client.chat.completions.create(model="fake", messages=image_message(), stream=True))
        assert upstream_in_flight(url) == 0


@pytest.mark.parametrize("mode, needle", [
    ("error500", "HTTP 500: "),
    ("garbage", "not"),
    ("not_http", "RemoteProtocolError"),
])
def test_upstream_answering_500_or_garbage_is_a_502_then_retried(tiny_llava_dir, mode, needle):
    """A 500, an HTML page, a plain-text "stream" or bytes that are not HTTP: 502 naming the fault
    when it is the only upstream; with a working one beside it, every request is answered."""
    with FakeUpstreamProcess(mode, str(tiny_llava_dir)) as bad, FakeUpstreamProcess("ok", str(tiny_llava_dir)) as good:
        with running_gateway(settings(tiny_llava_dir, [bad.url])) as url:
            for stream in (False, True):
                assert_openai_error(post(url, stream), 502, needle)
            assert upstream_in_flight(url) == 0
        with running_gateway(settings(tiny_llava_dir, [bad.url, good.url])) as url:
            for stream in (False, True, False, True):
                assert post(url, stream).status_code == 200


def test_upstream_closing_a_kept_alive_connection_costs_no_request(tiny_llava_dir):
    """An upstream that closes each kept-alive connection just as it is reused (the race vLLM's
    server and the gateway's connection pool can run into; a 15-minute soak lost 2 requests to it
    as 502s): the gateway sends the request once more on a new connection, so every request is
    answered, and counts the resends. Health checks go through the same resend (no flapping)."""
    with FakeUpstreamProcess("close_kept_alive", str(tiny_llava_dir)) as closing, \
            running_gateway(settings(tiny_llava_dir, [closing.url], health_interval_s=3600)) as url:
        for stream in (False, True, False, True, False, True):
            r = post(url, stream)
            assert r.status_code == 200, r.text[:300]
            assert "fake answer" in r.text
        samples = metric_samples(url)
        assert samples[("vlmprune_upstream_resends_total", ())] >= 5
        assert samples.get(("vlmprune_upstream_retries_total", ()), 0) == 0
        assert upstream_in_flight(url) == 0


def test_an_engine_fallback_is_reported_in_the_applied_header(tiny_llava_dir, tmp_path, monkeypatch):
    """The worker's side is tested on a real engine (test_plugin_survival.py: the report is written
    for the request that fell back, and for one reading its image from the encoder cache); here the
    stand-in writes that report, and the gateway must find it by the X-Request-Id it sent, say
    fallback= in X-VLMPrune-Applied (streamed or not), count it, and remove the report. The same
    folder behind a healthy upstream: no fallback= (the report is per request)."""
    monkeypatch.setenv("VLMPRUNE_TRACE_DIR", str(tmp_path))
    headers = {"X-VLMPrune-Method": "fastervlm", "X-VLMPrune-Ratio": "0.5"}
    body = {"model": "fake", "messages": image_message()}
    with FakeUpstreamProcess("fallback", str(tiny_llava_dir)) as failing, FakeUpstreamProcess("ok", str(tiny_llava_dir)) as ok:
        with running_gateway(settings(tiny_llava_dir, [failing.url], trace_dir=str(tmp_path))) as url:
            for stream in (False, True):
                r = httpx.post(url + CHAT, json={**body, "stream": stream}, headers=headers, timeout=30)
                assert r.status_code == 200, r.text[:300]
                applied = r.headers["X-VLMPrune-Applied"]
                assert "fallback=NonFiniteScoresError" in applied and "method=fastervlm" in applied, applied
            samples = metric_samples(url)
            assert samples[("vlmprune_fallbacks_total", (("method", "fastervlm"),))] == 2
            assert not list(tmp_path.glob("fallback-*")), "the gateway removes the reports it read"
        with running_gateway(settings(tiny_llava_dir, [ok.url], trace_dir=str(tmp_path))) as url:
            r = httpx.post(url + CHAT, json=body, headers=headers, timeout=30)
            assert r.status_code == 200 and "fallback" not in r.headers["X-VLMPrune-Applied"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_cancels_the_upstream_request_at_once(tiny_llava_dir, stream):
    """A completion that would take 30 s, whose client leaves (a stream after 3 chunks, an answer
    at its 1 s read timeout): within 3 s the upstream has seen its client (the gateway) leave and
    abandoned the request (aborted 1, completed 0, running 0), the gateway records a 499, holds
    nothing open and has not blamed the upstream. Before the fix the non-streaming request ran its
    30 s upstream after the client had gone."""
    with FakeUpstreamProcess("long", str(tiny_llava_dir), delay_s=30) as up, \
            running_gateway(settings(tiny_llava_dir, [up.url])) as url:
        body = {"model": "fake", "messages": image_message(), "stream": stream}
        if stream:
            with httpx.stream("POST", url + CHAT, json=body, timeout=30) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: dropping it mid-iteration would close the connection itself
                chunks = 0
                while chunks < 3:
                    chunks += next(lines).startswith("data: {")
                r.close()
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + CHAT, json=body, timeout=httpx.Timeout(30, read=1.0))
        left = time.monotonic()
        while metric_sum(up.url, "vllm:num_requests_running") != 0:
            assert time.monotonic() - left < 3, "the upstream request still runs 3 s after the client left"
            time.sleep(0.05)
        assert (metric_sum(up.url, "fake:aborted_total"), metric_sum(up.url, "fake:completed_total")) == (1, 0)
        samples = metric_samples(url)
        assert samples[("vlmprune_in_flight_requests", ())] == 0
        assert upstream_in_flight(url) == 0
        statuses = {dict(labels)["status"]: v for (n, labels), v in samples.items() if n == "vlmprune_requests_total"}
        assert statuses == {"499": 1}
        assert httpx.get(url + "/health", timeout=5).json()["upstreams"][0]["healthy"] is True


def test_timeouts_are_settings_with_bounds(monkeypatch):
    """The three timeouts come from VLMPRUNE_* variables and must be positive."""
    monkeypatch.setenv("VLMPRUNE_REQUEST_TIMEOUT_S", "30")
    monkeypatch.setenv("VLMPRUNE_STREAM_IDLE_TIMEOUT_S", "7.5")
    s = GatewaySettings(upstreams=["http://127.0.0.1:1"])
    assert (s.request_timeout_s, s.stream_idle_timeout_s, s.connect_timeout_s) == (30.0, 7.5, 5.0)
    monkeypatch.setenv("VLMPRUNE_STREAM_IDLE_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="stream_idle_timeout_s"):
        GatewaySettings(upstreams=["http://127.0.0.1:1"])
