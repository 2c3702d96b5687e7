"""Schema fuzzing with schemathesis: the gateway's own OpenAPI document, every operation, against
the real gateway in front of a real vLLM CPU engine (tiny LLaVA), one engine for the module.

Schemathesis generates bodies and ``X-VLMPrune-*`` headers that fit the document (positive) and
that break it (negative), sends them and checks every answer against the document: a documented
status, the documented content type and body schema (errors in OpenAI's shape), documented
headers; negative data must be refused with a 4xx. On top: no 5xx at all (the engine is healthy,
so even the documented 502/503 would mean an input broke it), and afterwards the gateway is healthy
and the engine still answers a good request. Examples are bounded and derandomised, so a CI run
tries the same cases every time; the counts per operation are printed (``-s``).
"""

from __future__ import annotations

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.chat.protocol import AppliedPolicy
from server.errors import ErrorResponse
from tests.server.conftest import image_message
from vlmprune.policy import kept_count

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 25
"""Generated cases per operation and generation mode (the coverage phase adds its boundary cases)."""

TRIED: collections.Counter[tuple[str, int]] = collections.Counter()
"""(operation, status) -> cases sent, for the module's closing summary."""


def gateway_document() -> dict:
    """The gateway's OpenAPI document, as ``create_app`` builds it (no network, nothing started);
    :func:`test_served_document_is_the_one_fuzzed` checks the running gateway serves the same."""
    from server.app import create_app
    from server.config import GatewaySettings

    return create_app(GatewaySettings(upstreams=["http://127.0.0.1:9"])).openapi()


schema = schemathesis.openapi.from_dict(gateway_document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=MAX_EXAMPLES, deterministic=True, database="none")


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    """The engine is healthy: any 5xx means a generated input broke the gateway or the engine."""
    if response.status_code >= 500:
        raise AssertionError(f"{case.operation.label} answered {response.status_code}: {response.text[:300]}")


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx/5xx of the API (not the Prometheus endpoint) is OpenAI's error JSON."""
    if response.status_code >= 400:
        body = ErrorResponse.model_validate_json(response.content)  # raises with the field at fault
        assert body.error.code == response.status_code, body
        assert body.error.message.strip(), body


@pytest.fixture(scope="module", autouse=True)
def closing_summary(engine_gateway):
    yield
    total = sum(TRIED.values())
    lines = [f"  {op} -> {status}: {n}" for (op, status), n in sorted(TRIED.items())]
    print(f"\n[schemathesis] {total} cases sent\n" + "\n".join(lines))


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=MAX_EXAMPLES)
def test_gateway_conforms_to_its_openapi_document(case, engine_gateway):
    """Every generated case gets a documented answer in the documented shape, and never a 5xx."""
    _, _, model_id = engine_gateway
    if case.operation.path == "/v1/chat/completions" and isinstance(case.body, dict):
        if case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
            case.body["model"] = model_id  # else almost every fitting case stops at vLLM's 404
        for field in ("max_tokens", "max_completion_tokens"):  # bounded engine time per case
            if isinstance(case.body.get(field, 2), int):
                case.body[field] = min(case.body.get(field, 2), 2)
    response = case.call(base_url=engine_gateway[0], timeout=120)
    TRIED[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, additional_checks=[no_server_error, openai_error_shape],
                           excluded_checks=[positive_data_acceptance])


def test_served_document_is_the_one_fuzzed(engine_gateway):
    """/openapi.json of the running gateway is the document the cases were generated from."""
    assert httpx.get(engine_gateway[0] + "/openapi.json").json() == gateway_document()


def test_healthy_and_serving_after_fuzzing(engine_gateway):
    """After every fuzz case: /health is ok and a good image request is answered by the engine."""
    url, _, model_id = engine_gateway
    assert httpx.get(url + "/health").json()["status"] == "ok"
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": model_id, "messages": image_message(), "max_tokens": 2})
    assert r.status_code == 200, r.text[:300]
    applied = AppliedPolicy.parse(r.headers["x-vlmprune-applied"])
    assert (applied.visual_tokens, applied.kept) == (36, kept_count(36, applied.ratio))
    assert r.json()["usage"]["prompt_tokens"] > applied.kept
