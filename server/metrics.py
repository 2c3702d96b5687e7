"""The gateway's Prometheus metrics (prometheus-client), one registry per app.

Labels are bounded: ``method`` is a registered method name, ``none`` (no image) or ``invalid``
(rejected before a policy was resolved); ``status`` is the HTTP status code; ``policy`` is a name
from the policies file; ``upstream`` a configured URL.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlmprune_requests", "Chat completion requests by method and HTTP status.", ["method", "status"], registry=r
        )
        self.latency = Histogram(
            "vlmprune_request_latency_seconds", "Request latency: arrival to last byte.", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "vlmprune_time_to_first_token_seconds", "Streaming requests: arrival to the first content chunk.",
            ["method"], buckets=TTFT_BUCKETS, registry=r,
        )
        self.visual_tokens = Counter(
            "vlmprune_visual_tokens", "Visual tokens of answered requests: input (uncompressed) and kept.",
            ["kind"], registry=r,
        )
        self.prefill_flops = Counter(
            "vlmprune_prefill_flops", "Analytic prefill FLOPs of answered requests: baseline (ratio 0) and actual.",
            ["kind"], registry=r,
        )
        self.fallbacks = Counter(
            "vlmprune_fallbacks", "Answered requests whose pruning fell back to evenly spaced tokens in the engine "
            "(a scorer failed: X-VLMPrune-Applied says fallback=).", ["method"], registry=r,
        )
        self.in_flight = Gauge("vlmprune_in_flight_requests", "Requests being answered now.", registry=r)
        self.pressure = Gauge(
            "vlmprune_load_pressure", "Load-adaptive pressure (0 = normal, 1 = saturated).", registry=r
        )
        self.policy_ratio = Gauge(
            "vlmprune_policy_ratio", "Current ratio of each named policy (moves with load when adaptive).",
            ["policy"], registry=r,
        )
        self.upstream_healthy = Gauge("vlmprune_upstream_healthy", "1 if the upstream passed its last check.",
                                      ["upstream"], registry=r)
        self.upstream_in_flight = Gauge("vlmprune_upstream_in_flight", "Requests open on each upstream.",
                                        ["upstream"], registry=r)
        self.retries = Counter("vlmprune_upstream_retries", "Requests retried on another upstream before any byte.",
                               registry=r)
        self.resends = Counter("vlmprune_upstream_resends",
                               "Requests sent once more to the same upstream after it closed a kept-alive "
                               "connection before answering.", registry=r)
        for kind in ("input", "kept"):
            self.visual_tokens.labels(kind)
        for kind in ("baseline", "actual"):
            self.prefill_flops.labels(kind)

    def render(self) -> bytes:
        return generate_latest(self.registry)
