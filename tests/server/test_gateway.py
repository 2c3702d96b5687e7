"""The real gateway (uvicorn, real HTTP) in front of small real HTTP servers standing in for vLLM.

These run without vLLM: the upstream stand-in (tests/server/fake_upstream.py) is needed to make an
upstream fail, saturate or die on demand; the same behaviours against a real ``vllm serve`` are
in test_vllm_e2e.py. The gateway counts tokens with the tiny LLaVA's real config (36 tokens/image).
"""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.chat.protocol import AppliedPolicy
from server.config import AdaptiveSettings, GatewaySettings
from tests.server.conftest import image_data_url, image_message, running_gateway
from tests.server.fake_upstream import FakeUpstream, free_port
from vlmprune.policy import kept_count

N_VISUAL = 36  # tiny LLaVA: 84 px / patch 14 -> 6 x 6


def settings(model_dir, upstreams, **kw) -> GatewaySettings:
    return GatewaySettings(upstreams=upstreams, model_dir=str(model_dir), health_interval_s=0.1, **kw)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def gateway(tiny_llava_dir, fake_upstream):
    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url])) as url:
        yield url, fake_upstream


def test_policy_written_into_body_and_applied_header(gateway):
    """Headers become mm_processor_kwargs.vlmprune; X-VLMPrune-Applied reports 36 in, kept_count out."""
    url, up = gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=image_message(), max_tokens=3,
        extra_headers={"X-VLMPrune-Method": "random", "X-VLMPrune-Ratio": "0.9"},
    )
    assert raw.parse().choices[0].message.content == "fake answer"
    applied = AppliedPolicy.parse(raw.headers["x-vlmprune-applied"])
    assert (applied.method, applied.ratio, applied.visual_tokens, applied.kept) == ("random", 0.9, 36, 4)
    assert applied.source == "header" and applied.route == "pre_llm"
    sent = up.bodies[-1]["mm_processor_kwargs"]["vlmprune"]
    assert sent == {"method": "random", "ratio": 0.9, "seed": 0}  # pre-LLM: no instruction sent


def test_body_policy_and_instruction_reach_upstream(gateway):
    """The body's policy survives (header ratio wins); probe-scored methods get the user text, the
    in-LLM route's (the default) do not (they read the prompt's own rows)."""
    url, up = gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    client.chat.completions.create(
        model="fake", messages=image_message("how many boxes ?", n_images=2), max_tokens=3,
        extra_body={"mm_processor_kwargs": {"vlmprune": {"method": "random", "ratio": 0.5, "seed": 9}}},
        extra_headers={"X-VLMPrune-Ratio": "0.75"},
    )
    assert up.bodies[-1]["mm_processor_kwargs"]["vlmprune"] == {"method": "random", "ratio": 0.75, "seed": 9}
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=image_message("how many boxes ?", n_images=2), max_tokens=3,
        extra_headers={"X-VLMPrune-Method": "transprune", "X-VLMPrune-Ratio": "0.5"},
    )
    sent = up.bodies[-1]["mm_processor_kwargs"]["vlmprune"]
    assert sent["method"] == "transprune" and "instruction" not in sent
    applied = AppliedPolicy.parse(raw.headers["x-vlmprune-applied"])
    assert applied.visual_tokens == 2 * N_VISUAL and applied.route == "in_llm" and applied.stages
    raw = client.chat.completions.with_raw_response.create(
        model="fake", messages=image_message("how many boxes ?"), max_tokens=3,
        extra_headers={"X-VLMPrune-Method": "explain", "X-VLMPrune-Ratio": "0.5"},
    )
    sent = up.bodies[-1]["mm_processor_kwargs"]["vlmprune"]
    assert sent["method"] == "explain" and "instruction" not in sent  # in-LLM: the prompt's own rows
    applied = AppliedPolicy.parse(raw.headers["x-vlmprune-applied"])
    assert applied.route == "in_llm" and applied.visual_tokens == N_VISUAL and applied.stages


def test_streaming_passes_chunks_through(gateway):
    """A stream arrives chunk by chunk, unchanged, with the applied header."""
    url, _ = gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    with client.chat.completions.with_streaming_response.create(
        model="fake", messages=image_message(), max_tokens=3, stream=True,
        extra_headers={"X-VLMPrune-Policy": "fast"},
    ) as resp:
        applied = AppliedPolicy.parse(resp.headers["x-vlmprune-applied"])
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "fake answer here"
    assert (applied.policy, applied.ratio, applied.kept) == ("fast", 0.9, kept_count(36, 0.9))


def _png_bytes() -> bytes:
    return base64.b64decode(image_data_url().split(",", 1)[1])


def _data(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


BAD_REQUESTS = [
    ("ratio-text", {"X-VLMPrune-Ratio": "abc"}, None, 400, "X-VLMPrune-Ratio"),
    ("ratio-range", {"X-VLMPrune-Ratio": "1.5"}, None, 400, "X-VLMPrune-Ratio"),
    ("method", {"X-VLMPrune-Method": "zip"}, None, 400, "'zip'"),
    ("policy", {"X-VLMPrune-Policy": "turbo"}, None, 400, "'turbo'"),
    ("method-model", {"X-VLMPrune-Method": "globalcom2"}, None, 400, "'llava'"),
    ("body-option", {}, {"mm_processor_kwargs": {"vlmprune": {"method": "pool", "seed": 1}}}, 400, "'seed'"),
    ("base64", {}, {"messages": image_message(url="data:image/png;base64,@@@")}, 400, "base64"),
    ("not-image", {}, {"messages": image_message(url=_data(b"hello world", "text/plain"))}, 400, "not an image"),
    ("garbage", {}, {"messages": image_message(url=_data(b"\x89PNG\r\n\x1a\nxxxxxxxxxxxxxxxx"))}, 400, "corrupt"),
    ("truncated", {}, {"messages": image_message(url=_data(_png_bytes()[:60]))}, 400, "corrupt"),
    ("remote", {}, {"messages": image_message(url="http://example.com/a.png")}, 400, "remote"),
    ("too-many", {}, {"messages": image_message(n_images=9)}, 400, "limit of 8"),
    ("no-messages", {}, {"messages": []}, 400, "messages"),
    ("trace-id", {"X-VLMPrune-Trace": "../../etc/passwd"}, None, 400, "X-VLMPrune-Trace"),
]


@pytest.mark.parametrize("name, headers, body, status, needle", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_its_status_in_openai_shape(gateway, name, headers, body, status, needle):
    """Every bad input: its status, OpenAI's error JSON naming the problem; the upstream never sees it."""
    url, up = gateway
    payload = {"model": "fake", "messages": image_message(), "max_tokens": 3, **(body or {})}
    n_before = len(up.bodies)
    r = httpx.post(url + "/v1/chat/completions", json=payload, headers=headers)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == "invalid_request_error" and needle in err["message"]
    assert "Traceback" not in r.text
    assert r.headers["x-vlmprune-applied"] == "none"  # nothing was applied
    assert len(up.bodies) == n_before
    assert httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()}).status_code == 200


def test_invalid_json_oversized_body_and_unknown_route(tiny_llava_dir, fake_upstream):
    """Non-JSON: 400; body over max_body_bytes: 413; unknown path: 404 in OpenAI shape."""
    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url], max_body_bytes=1024)) as url:
        r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == 400
        r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message("x " * 600)})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = httpx.get(url + "/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_request_headers_over_max_header_bytes_are_a_431_in_openai_shape(tiny_llava_dir, fake_upstream):
    """Headers past max_header_bytes (the default 32 KiB, and a setting): 431 naming the size and the
    limit in OpenAI's shape, on every route, nothing forwarded; just under the limit is served.
    uvicorn's own parser would accept any size (httptools) or answer a plain-text 400 (h11)."""
    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url])) as url:
        n_before = len(fake_upstream.bodies)
        body = {"model": "fake", "messages": image_message()}
        for path in ("/v1/chat/completions", "/health"):
            r = httpx.request("POST" if "chat" in path else "GET", url + path, json=body,
                              headers={"x-filler": "x" * 40_000}, timeout=30)
            assert r.status_code == 431, r.text[:200]
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == 431
            assert "over the limit of 32768 (max_header_bytes)" in err["message"]
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"x-filler": "x" * 30_000}, timeout=30)
        assert r.status_code == 200
        assert len(fake_upstream.bodies) == n_before + 1
    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url], max_header_bytes=4096)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"x-filler": "x" * 5000}, timeout=30)
        assert r.status_code == 431 and "limit of 4096" in r.json()["error"]["message"]


def test_client_that_leaves_while_sending_its_body_is_a_499_not_a_500(tiny_llava_dir, fake_upstream):
    """A client that announces 100 000 bytes, sends 100 and hangs up: counted as a 499 (no
    "unexpected error" 500), nothing forwarded, nothing left in flight."""
    import socket

    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url])) as url:
        n_before = len(fake_upstream.bodies)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b"{" * 100)
            time.sleep(0.3)
        deadline = time.time() + 5
        while scrape(url).get(("vlmprune_requests_total", (("method", "none"), ("status", "499")))) != 1:
            assert time.time() < deadline, {k: v for k, v in scrape(url).items() if "requests_total" in k[0]}
            time.sleep(0.05)
        samples = scrape(url)
        assert not any(n == "vlmprune_requests_total" and ("status", "500") in labels for n, labels in samples)
        assert samples[("vlmprune_in_flight_requests", ())] == 0
        assert len(fake_upstream.bodies) == n_before


def test_api_keys(tiny_llava_dir, fake_upstream):
    """With keys configured: 401 without or with a wrong key (OpenAI client raises AuthenticationError)."""
    with running_gateway(settings(tiny_llava_dir, [fake_upstream.url], api_keys=["sesame"])) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401
        ok = openai.OpenAI(base_url=url + "/v1", api_key="sesame")
        assert ok.chat.completions.create(model="fake", messages=image_message()).choices
        assert [m.id for m in ok.models.list().data] == ["fake"]
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_retry_on_another_upstream_before_first_byte(tiny_llava_dir):
    """A 500 or a refused connection is retried on the next upstream; the client sees 200 only."""
    bad = FakeUpstream(model_root=str(tiny_llava_dir), mode="error500").start()
    good = FakeUpstream(model_root=str(tiny_llava_dir)).start()
    refused = f"http://127.0.0.1:{free_port()}"
    try:
        with running_gateway(settings(tiny_llava_dir, [bad.url, refused, good.url])) as url:
            for stream in (False, True, False, True):
                r = httpx.post(url + "/v1/chat/completions",
                               json={"model": "fake", "messages": image_message(), "stream": stream})
                assert r.status_code == 200
            assert bad.bodies, "the failing upstream was tried"
            assert metric(scrape(url), "vlmprune_upstream_retries_total") >= 1
    finally:
        bad.stop()
        good.stop()


def test_no_upstream_left_is_502_or_503(tiny_llava_dir):
    """Only failing upstreams: 502 (they answered 5xx); only unreachable ones: 503. Never 500."""
    bad = FakeUpstream(model_root=str(tiny_llava_dir), mode="error500").start()
    try:
        with running_gateway(settings(tiny_llava_dir, [bad.url])) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()})
            assert r.status_code == 502 and r.json()["error"]["type"] == "upstream_error"
    finally:
        bad.stop()
    with running_gateway(settings(tiny_llava_dir, [f"http://127.0.0.1:{free_port()}"])) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        assert httpx.get(url + "/health").status_code == 503


def test_upstream_dying_mid_stream_ends_stream_with_error_event(tiny_llava_dir):
    """The dying upstream's stream ends in an error event (openai.APIError); later requests succeed."""
    dying = FakeUpstream(model_root=str(tiny_llava_dir), mode="die_mid_stream").start()
    good = FakeUpstream(model_root=str(tiny_llava_dir)).start()
    try:
        with running_gateway(settings(tiny_llava_dir, [dying.url, good.url])) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            errors = 0
            for _ in range(2):  # ties rotate: one of two requests lands on the dying upstream
                if errors:
                    break
                stream = client.chat.completions.create(model="fake", messages=image_message(), stream=True)
                try:
                    for _chunk in stream:
                        pass
                except openai.APIError as exc:
                    errors += 1
                    assert "upstream failed during the stream" in str(exc)
            assert errors == 1 and dying.bodies
            dying.stop()  # "killed"
            for _ in range(4):
                stream = client.chat.completions.create(model="fake", messages=image_message(), stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "fake answer here"
            samples = scrape(url)
            assert metric(samples, "vlmprune_requests_total", method="fastervlm", status="502") == 1
    finally:
        good.stop()


def test_load_adaptive_ratio_rises_and_falls(tiny_llava_dir, fake_upstream):
    """Queue over target -> balanced's ratio rises to 0.9 (header + metrics); calm -> back to 0.75."""
    s = settings(tiny_llava_dir, [fake_upstream.url], adaptive=AdaptiveSettings(queue_target=4, step=0.5))
    with running_gateway(s) as url:
        def applied():
            r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()})
            return AppliedPolicy.parse(r.headers["x-vlmprune-applied"])

        assert applied().ratio == 0.75
        fake_upstream.waiting = 10
        time.sleep(0.6)
        a = applied()
        assert (a.ratio, a.source, a.kept) == (0.9, "adaptive", kept_count(36, 0.9))
        samples = scrape(url)
        assert metric(samples, "vlmprune_load_pressure") == 1.0
        assert metric(samples, "vlmprune_policy_ratio", policy="balanced") == 0.9
        assert metric(samples, "vlmprune_policy_ratio", policy="quality") == 0.5  # not adaptive
        # an explicit ratio is never raised
        r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()},
                       headers={"X-VLMPrune-Ratio": "0.2"})
        assert AppliedPolicy.parse(r.headers["x-vlmprune-applied"]).ratio == 0.2
        fake_upstream.waiting = 0
        time.sleep(0.6)
        assert applied().ratio == 0.75
        assert metric(scrape(url), "vlmprune_load_pressure") == 0.0


def test_metrics_parse_and_move(gateway):
    """/metrics parses; requests, visual tokens (36 in, 4 kept at 0.9) and FLOPs move as expected."""
    url, up = gateway
    before = scrape(url)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    client.chat.completions.create(model="fake", messages=image_message(), extra_headers={"X-VLMPrune-Ratio": "0.9"})
    httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": image_message()},
               headers={"X-VLMPrune-Ratio": "oops"})
    after = scrape(url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("vlmprune_requests_total", method="fastervlm", status="200") == 1
    assert delta("vlmprune_requests_total", method="invalid", status="400") == 1
    assert delta("vlmprune_visual_tokens_total", kind="input") == 36
    assert delta("vlmprune_visual_tokens_total", kind="kept") == 4
    base, actual = delta("vlmprune_prefill_flops_total", kind="baseline"), delta("vlmprune_prefill_flops_total", kind="actual")
    assert base > actual > 0
    assert delta("vlmprune_request_latency_seconds_count", method="fastervlm") == 1
    assert metric(after, "vlmprune_in_flight_requests") == 0
    assert metric(after, "vlmprune_upstream_in_flight", upstream=up.url) == 0


def test_text_only_request_passes_untouched(gateway):
    """No image: the body is forwarded without a vlmprune policy; the header says 0 visual tokens."""
    url, up = gateway
    r = httpx.post(url + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert "mm_processor_kwargs" not in up.bodies[-1]
    assert AppliedPolicy.parse(r.headers["x-vlmprune-applied"]).visual_tokens == 0


def test_instruction_extraction():
    """The user text after the last image; when the question precedes the image, that message's text."""
    from server.chat.serving import instruction_text

    img = {"type": "image_url", "image_url": {"url": "data:"}}
    assert instruction_text([{"role": "user", "content": [img, {"type": "text", "text": "what ?"}]}]) == "what ?"
    assert instruction_text([{"role": "user", "content": [{"type": "text", "text": "first"}, img]}]) == "first"
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, img, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "x"}, {"role": "user", "content": "c"}]
    assert instruction_text(msgs) == "b c"
    assert instruction_text([{"role": "user", "content": "no image"}]) == ""


def test_playground_page_and_routes_without_a_trace_folder(gateway):
    """/playground serves the page and its script; methods fit the model (tiny LLaVA: no globalcom2,
    no explain CNN); a traced run without trace_dir forwards no trace id and reports its cost with
    a note instead of an overlay; an unknown run is a 404 in OpenAI's shape."""
    url, up = gateway
    page = httpx.get(url + "/playground")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/playground/static/playground.js" in page.text
    assert httpx.get(url + "/playground/static/playground.js").status_code == 200
    meta = httpx.get(url + "/v1/vlmprune/methods").json()
    assert meta["family"] == "llava" and meta["tracing"] is False and meta["ratio_step"] == 0.005
    assert [(m["name"], m["route"]) for m in meta["methods"]] == [
        ("fastervlm", "pre_llm"), ("aim", "in_llm"), ("transprune", "in_llm"), ("fastv", "in_llm"), ("random", "pre_llm"),
        ("pool", "pre_llm")]
    assert {p["name"] for p in meta["policies"]} == {"quality", "balanced", "fast"}
    scene = httpx.get(url + "/v1/vlmprune/demo-scene", params={"index": 3}).json()
    assert scene["image"].startswith("data:image/png;base64,") and scene["question"] and scene["answer"]

    payload = {"model": "fake", "messages": image_message(), "max_tokens": 3}
    r = httpx.post(url + "/v1/chat/completions", json=payload,
                   headers={"X-VLMPrune-Trace": "run-12345678", "X-VLMPrune-Ratio": "0.5"})
    assert r.status_code == 200
    assert "trace" not in up.bodies[-1]["mm_processor_kwargs"]["vlmprune"]
    trace = httpx.get(url + "/v1/vlmprune/traces/run-12345678").json()
    assert trace["status"] == 200 and trace["stages"] == [{"where": "LLM input", "kept": 18, "of": N_VISUAL}]
    assert 0 < trace["cost"]["saved_fraction"] < 1 and "trace_dir" in trace["overlay_note"]
    assert trace["images"][0]["kept"] is None and trace["images"][0]["kept_count"] == 18
    missing = httpx.get(url + "/v1/vlmprune/traces/run-00000000")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "trace_id"
