"""End to end: `vlmprune serve` (a real `vllm serve` CPU engine with the plugin + the gateway),
driven with the official `openai` client. One vLLM engine for the whole module.

The second upstream for the mid-stream failure is the small real HTTP server of fake_upstream.py
(a second vLLM engine would double the module's cost on a 2-core machine); the engine that
survives and answers afterwards is the real one.
"""

from __future__ import annotations

import concurrent.futures
import re
import signal

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.chat.protocol import AppliedPolicy
from server.config import GatewaySettings
from tests.server.conftest import image_message, running_gateway, serve_process
from tests.server.fake_upstream import FakeUpstream
from vlmprune.policy import kept_count

pytestmark = pytest.mark.slow
N_VISUAL = 36


@pytest.fixture(scope="module")
def served(tiny_llava_dir, tmp_path_factory):
    """`python -m vlmprune serve --model DIR` in a subprocess; yields (url, vllm_url, proc, log, seconds)."""
    with serve_process(tiny_llava_dir, tmp_path_factory.mktemp("serve") / "serve.log") as out:
        yield out


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def scrape(url: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ask(client, model_id, ratio=None, method=None, stream=False, **kw):
    headers = {}
    if ratio is not None:
        headers["X-VLMPrune-Ratio"] = str(ratio)
    if method is not None:
        headers["X-VLMPrune-Method"] = method
    return client.chat.completions.with_raw_response.create(
        model=model_id, messages=image_message(), max_tokens=4, temperature=0.0, stream=stream,
        extra_headers=headers, **kw,
    )


def test_startup_prints_url_and_curl_example(served):
    """The launcher prints progress, the URL, a curl example and its start-up time."""
    url, _, _, log, seconds = served
    text = log.read_text()
    assert "waiting for vLLM" in text or "vLLM ready" in text
    assert f"vlmprune gateway ready: {url}" in text and "curl -s -D -" in text and "X-VLMPrune-Ratio" in text
    assert "vlmprune scene --out scene.png" in text and "deploy/client.py scene.png" in text
    assert f"playground (what each policy keeps, answers and costs): {url}/playground" in text
    m = re.search(r"started in ([\d.]+) s \(vLLM ([\d.]+) s\)", text)
    assert m and float(m.group(1)) <= seconds + 1
    print(f"\nvlmprune serve start-up: {m.group(1)} s (vLLM {m.group(2)} s)")


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_prompt_shrinks_by_exactly_the_pruned_visual_tokens(client, model_id, method):
    """usage.prompt_tokens at ratio 0.9 = at ratio 0 minus (36 - kept_count(36, 0.9)); header agrees."""
    r0, r9 = ask(client, model_id, 0.0, method), ask(client, model_id, 0.9, method)
    p0, p9 = r0.parse().usage.prompt_tokens, r9.parse().usage.prompt_tokens
    assert p0 - p9 == N_VISUAL - kept_count(N_VISUAL, 0.9) == 32
    a0, a9 = (AppliedPolicy.parse(r.headers["x-vlmprune-applied"]) for r in (r0, r9))
    assert (a0.method, a0.visual_tokens, a0.kept) == (method, N_VISUAL, N_VISUAL)
    assert (a9.ratio, a9.kept) == (0.9, kept_count(N_VISUAL, 0.9))


def test_streaming_with_headers(client, model_id):
    """A stream through the gateway: chunks arrive, the usage chunk shows the pruned prompt."""
    ref = ask(client, model_id, 0.5).parse()
    with client.chat.completions.with_streaming_response.create(
        model=model_id, messages=image_message(), max_tokens=4, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-VLMPrune-Ratio": "0.5"},
    ) as resp:
        applied = AppliedPolicy.parse(resp.headers["x-vlmprune-applied"])
        chunks = list(resp.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content  # greedy: same answer streamed or not
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens
    assert applied.kept == kept_count(N_VISUAL, 0.5) == 18


def test_named_policy_and_body_precedence(client, model_id):
    """X-VLMPrune-Policy: fast = 0.9; a body policy is used unless a header overrides it."""
    fast = client.chat.completions.with_raw_response.create(
        model=model_id, messages=image_message(), max_tokens=2, extra_headers={"X-VLMPrune-Policy": "fast"})
    body = client.chat.completions.with_raw_response.create(
        model=model_id, messages=image_message(), max_tokens=2,
        extra_body={"mm_processor_kwargs": {"vlmprune": {"method": "pool", "ratio": 0.9}}})
    both = client.chat.completions.with_raw_response.create(
        model=model_id, messages=image_message(), max_tokens=2, extra_headers={"X-VLMPrune-Ratio": "0"},
        extra_body={"mm_processor_kwargs": {"vlmprune": {"method": "pool", "ratio": 0.9}}})
    p = [r.parse().usage.prompt_tokens for r in (fast, body, both)]
    assert p[0] == p[1] == p[2] - 32
    assert AppliedPolicy.parse(both.headers["x-vlmprune-applied"]).source == "header"


def test_metrics_move(served, client, model_id):
    """/metrics parses; counts, visual tokens, FLOPs, TTFT move by what the requests did."""
    url = served[0]
    before = scrape(url)
    ask(client, model_id, 0.9)
    with ask(client, model_id, 0.9, stream=True).parse() as stream:
        list(stream)
    after = scrape(url)

    def d(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert d("vlmprune_requests_total", method="fastervlm", status="200") == 2
    assert d("vlmprune_visual_tokens_total", kind="input") == 2 * N_VISUAL
    assert d("vlmprune_visual_tokens_total", kind="kept") == 2 * kept_count(N_VISUAL, 0.9)
    assert d("vlmprune_prefill_flops_total", kind="baseline") > d("vlmprune_prefill_flops_total", kind="actual") > 0
    assert d("vlmprune_time_to_first_token_seconds_count", method="fastervlm") == 1
    assert d("vlmprune_request_latency_seconds_count", method="fastervlm") == 2
    assert value(after, "vlmprune_upstream_healthy", upstream=served[1]) == 1.0
    assert value(after, "vlmprune_upstream_in_flight", upstream=served[1]) == 0.0
    assert value(after, "vlmprune_in_flight_requests") == 0.0


def test_every_bad_input_gets_its_status_and_serving_continues(served, client, model_id):
    """Gateway 400s, an upstream 400 passed through unchanged (a method the plugin refuses), 413, 401-free."""
    url = served[0]
    cases = [
        ({"X-VLMPrune-Ratio": "abc"}, {}, 400),
        ({"X-VLMPrune-Ratio": "1"}, {}, 400),
        ({"X-VLMPrune-Method": "nope"}, {}, 400),
        ({"X-VLMPrune-Policy": "nope"}, {}, 400),
        ({"X-VLMPrune-Method": "globalcom2"}, {}, 400),
        ({}, {"messages": image_message(url="data:image/png;base64,AAAA")}, 400),
        ({}, {"messages": image_message(n_images=9)}, 400),
        ({}, {"messages": image_message(url="https://example.com/x.png")}, 400),
        ({}, {"messages": image_message("x " * 12_000_000)}, 413),
    ]
    for headers, body, status in cases:
        payload = {"model": model_id, "messages": image_message(), "max_tokens": 2, **body}
        r = httpx.post(url + "/v1/chat/completions", json=payload, headers=headers, timeout=60)
        assert r.status_code == status, (headers, r.text[:300])
        assert r.json()["error"]["code"] == status
    assert ask(client, model_id, 0.9).parse().usage.prompt_tokens > 0


def test_upstream_killed_mid_stream_then_remaining_upstream_serves(served, tiny_llava_dir, model_id):
    """Gateway over [dying stand-in, real vLLM]: the dying stream ends with an error event
    (openai.APIError); every later request is answered by the real engine."""
    dying = FakeUpstream(model_root=str(tiny_llava_dir), mode="die_mid_stream").start()
    settings = GatewaySettings(upstreams=[dying.url, served[1]], model_dir=str(tiny_llava_dir), health_interval_s=0.2)
    with running_gateway(settings) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        errors = 0
        for _ in range(3):
            stream = client.chat.completions.create(model=model_id, messages=image_message(), max_tokens=4,
                                                    stream=True)
            try:
                list(stream)
            except openai.APIError:
                errors += 1
                break
        assert errors == 1 and dying.bodies
        dying.stop()
        for _ in range(3):
            out = client.chat.completions.create(model=model_id, messages=image_message(), max_tokens=4,
                                                 extra_headers={"X-VLMPrune-Ratio": "0.9"})
            assert out.usage.prompt_tokens > 0 and out.model == model_id
        health = httpx.get(url + "/health").json()
        assert [u["healthy"] for u in health["upstreams"]] == [False, True]


def test_32_concurrent_requests_all_answered(client, model_id):
    """32 concurrent requests (mixed ratios, half streaming) all succeed with the right prompt length."""
    p0 = ask(client, model_id, 0.0).parse().usage.prompt_tokens

    def one(i):
        ratio = (0.0, 0.5, 0.9, 0.75)[i % 4]
        expected = p0 - (N_VISUAL - kept_count(N_VISUAL, ratio))
        if i % 2:
            with client.chat.completions.with_streaming_response.create(
                model=model_id, messages=image_message(), max_tokens=4, stream=True,
                stream_options={"include_usage": True}, extra_headers={"X-VLMPrune-Ratio": str(ratio)},
            ) as resp:
                return list(resp.parse())[-1].usage.prompt_tokens == expected
        return ask(client, model_id, ratio).parse().usage.prompt_tokens == expected

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(results), results


def test_sigterm_stops_gateway_and_vllm_without_orphans(served):
    """SIGTERM to `vlmprune serve`: exit 0, and every process it started (vLLM and its engine) is gone."""
    _, _, proc, log, _ = served
    descendants = psutil.Process(proc.pid).children(recursive=True)
    assert descendants, "vLLM child processes expected"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-2000:]
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert "stopping vLLM" in log.read_text()
