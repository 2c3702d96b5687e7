"""vLLM's data parallelism behind the gateway: `vlmprune serve --vllm-arg=--data-parallel-size=2`
runs two engine cores (one process each, on vLLM's CPU build) behind one vLLM API server.

Each policy's request is sent 6 times at once, so vLLM's load balancer spreads them over both
engines (checked on vLLM's per-engine counters): every answer, prompt length and
``X-VLMPrune-Applied`` header must equal the first one's (two engines, the same answer), and the
gateway must count every request. Methods: stock, a pre-LLM one, the in-LLM route's three.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from tests.server.conftest import image_message, metric_samples, serve_process

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
COPIES = 6
POLICIES = [None, ("fastervlm", 0.75), ("transprune", 0.75), ("aim", 0.75), ("fastv", 0.5)]


@pytest.fixture(scope="module")
def served(tiny_llava_dir, tmp_path_factory):
    with serve_process(tiny_llava_dir, tmp_path_factory.mktemp("serve-dp") / "serve.log", 1200,
                       "--vllm-arg=--data-parallel-size=2") as out:
        yield out


def ask(url: str, policy) -> tuple[int, dict, str]:
    headers = {} if policy is None else {"X-VLMPrune-Method": policy[0], "X-VLMPrune-Ratio": str(policy[1])}
    model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(url + CHAT, json={"model": model, "messages": image_message(), "max_tokens": 4, "temperature": 0.0},
                   headers=headers, timeout=300)
    return r.status_code, r.json(), r.headers.get("X-VLMPrune-Applied", "")


def per_engine_successes(vllm_url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in metric_samples(vllm_url).items():
        if name == "vllm:request_success_total":
            engine = dict(labels).get("engine", "?")
            out[engine] = out.get(engine, 0.0) + v
    return out


def test_both_engines_give_every_policy_the_same_answer(served):
    url, vllm_url = served[0], served[1]
    before = per_engine_successes(vllm_url)
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
    after = per_engine_successes(vllm_url)
    served_by = {e: after.get(e, 0.0) - before.get(e, 0.0) for e in after}
    assert sum(served_by.values()) == COPIES * len(POLICIES)
    assert len([e for e, n in served_by.items() if n > 0]) == 2, f"one engine served everything: {served_by}"
    total = sum(v for (n, labels), v in metric_samples(url).items()
                if n == "vlmprune_requests_total" and ("status", "200") in labels)
    assert total >= COPIES * len(POLICIES)
