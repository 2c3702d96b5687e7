"""Two engines behind the gateway, in the two ways users run them:

- ``dp2``: vLLM's data parallelism, `vlmprune serve --vllm-arg=--data-parallel-size=2`: two engine
  cores (one process each, on vLLM's CPU build) behind one vLLM API server, which balances them;
- ``two-upstreams``: two separate ``vllm serve`` engines (started by the launcher's own functions,
  sharing one trace folder) behind one gateway, which balances them (least loaded, ties rotate).

Each policy's request is sent 6 times at once, so both engines serve some (checked on vLLM's own
success counters): every answer, prompt length and ``X-VLMPrune-Applied`` header must equal the
first one's (two engines, the same answer), and the gateway must count every request. Methods:
stock, a pre-LLM one, the in-LLM route's three. Traced copies must hold the same kept tokens
whichever engine wrote them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable

import httpx
import pytest

from tests.server.conftest import image_message, metric_samples, running_gateway, serve_process, vllm_engine

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
COPIES = 6
POLICIES = [None, ("fastervlm", 0.75), ("transprune", 0.75), ("aim", 0.75), ("fastv", 0.5)]


def successes(vllm_url: str) -> dict[str, float]:
    """vLLM's finished requests per engine (its ``engine`` label) of one vLLM server."""
    out: dict[str, float] = {}
    for (name, labels), v in metric_samples(vllm_url).items():
        if name == "vllm:request_success_total":
            engine = dict(labels).get("engine", "?")
            out[engine] = out.get(engine, 0.0) + v
    return out


@pytest.fixture(scope="module", params=["dp2", "two-upstreams"])
def served(request, tiny_llava_dir, tmp_path_factory) -> tuple[str, Callable[[], dict[str, float]]]:
    """(gateway URL, a function giving each engine's finished-request count)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "dp2":
        with serve_process(tiny_llava_dir, root / "serve.log", 1200, "--vllm-arg=--data-parallel-size=2") as out:
            yield out[0], lambda: successes(out[1])
        return
    from server.config import GatewaySettings

    traces = root / "traces"
    traces.mkdir()
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(vllm_engine(tiny_llava_dir, root / f"vllm{i}.log", trace_dir=traces))
                for i in range(2)]
        settings = GatewaySettings(upstreams=urls, model_dir=str(tiny_llava_dir), health_interval_s=0.5,
                                   trace_dir=str(traces))
        url = stack.enter_context(running_gateway(settings))
        yield url, lambda: {u: sum(successes(u).values()) for u in urls}


def ask(url: str, policy) -> tuple[int, dict, str]:
    headers = {} if policy is None else {"X-VLMPrune-Method": policy[0], "X-VLMPrune-Ratio": str(policy[1])}
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(url + CHAT, json={"model": model, "messages": image_message(), "max_tokens": 4, "temperature": 0.0},
                   headers=headers, timeout=300)
    return r.status_code, r.json(), r.headers.get("X-VLMPrune-Applied", "")


def test_both_engines_give_every_policy_the_same_answer(served):
    url, engine_counts = served
    before = engine_counts()
    with concurrent.futures.ThreadPoolExecutor(COPIES) as pool:
        for policy in POLICIES:
            answers = list(pool.map(lambda _: ask(url, policy), range(COPIES)))
            statuses = {a[0] for a in answers}
            assert statuses == {200}, (policy, [a[1] for a in answers if a[0] != 200][:1])
            texts = {a[1]["choices"][0]["message"]["content"] for a in answers}
            prompts = {a[1]["usage"]["prompt_tokens"] for a in answers}
            headers = {a[2] for a in answers}
            assert len(texts) == len(prompts) == len(headers) == 1, (policy, texts, prompts, headers)
            if policy is not None:
                assert f"method={policy[0]}" in headers.pop()
    after = engine_counts()
    served_by = {e: after.get(e, 0.0) - before.get(e, 0.0) for e in after}
    assert sum(served_by.values()) == COPIES * len(POLICIES)
    assert len([e for e, n in served_by.items() if n > 0]) == 2, f"one engine served everything: {served_by}"
    total = sum(v for (n, labels), v in metric_samples(url).items()
                if n == "vlmprune_requests_total" and ("status", "200") in labels)
    assert total >= COPIES * len(POLICIES)


@pytest.mark.parametrize("policy", [("fastervlm", 0.75), ("transprune", 0.75)])
def test_both_engines_write_the_same_traces(served, policy):
    """Traced copies of one request (each its own trace id, so none reads another's encoder or
    prefix cache) spread over both engines: the kept tokens each engine wrote to the shared trace
    folder, read back through ``/v1/vlmprune/traces/{id}``, are the same for every copy."""
    url, engine_counts = served
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    ids = [f"dp-{policy[0]}-{i:04d}" for i in range(COPIES)]

    def traced(trace_id: str) -> dict:
        headers = {"X-VLMPrune-Method": policy[0], "X-VLMPrune-Ratio": str(policy[1]), "X-VLMPrune-Trace": trace_id}
        r = httpx.post(url + CHAT, json={"model": model, "messages": image_message(), "max_tokens": 2,
                                         "temperature": 0.0}, headers=headers, timeout=300)
        assert r.status_code == 200, r.text[:300]
        return httpx.get(url + f"/v1/vlmprune/traces/{trace_id}", timeout=10).json()

    before = engine_counts()
    with concurrent.futures.ThreadPoolExecutor(COPIES) as pool:
        traces = list(pool.map(traced, ids))
    after = engine_counts()
    assert len([e for e in after if after[e] > before.get(e, 0.0)]) == 2, "one engine wrote every trace"
    kept = [[im["kept"] for im in t["images"]] for t in traces]  # in-LLM: the last stage's
    assert all(k is not None for k in kept[0]), f"the engine wrote no kept tokens: {traces[0]}"
    assert all(k == kept[0] for k in kept), "two engines kept different tokens for the same request"
    assert len({str(t["stages"]) for t in traces}) == 1
