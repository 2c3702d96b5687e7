"""bench/soak.py: its verdict on synthetic outcomes, and (slow) a few seconds of a real soak.

The fast tests give the summariser outcomes and memory readings made up to cross each bound. The
``slow`` test runs the script itself for a few seconds against a real `vlmprune serve --model demo`
(a vLLM CPU engine and the gateway), so most of its time is the engine's start-up.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.bench import BENCH_DIR, load_bench

SOAK = BENCH_DIR / "soak.py"


soak = load_bench("soak")


def _summary(outcomes, engine_end=1000.0):
    args = soak.parse_args(["--duration", "10", "--max-engine-growth-mib", "300"])
    rss = {"start": {"gateway": 200.0, "engine": 1000.0}, "end": {"gateway": 210.0, "engine": engine_end},
           "peak": {"gateway": 220.0, "engine": max(1000.0, engine_end)}, "samples": []}
    checks = {"in_flight_after": 0.0, "health_after": 200, "serve_exit_code": 0, "startup_s": 1.0, "host": "test"}
    return soak.summarize(outcomes, rss, args, {"methods": ["fastervlm"], "checks": checks})


def _ok(kind="good", stream=False, seconds=0.1):
    return soak.Outcome(kind, stream, True, 200 if kind == "good" else 400, seconds, correct=kind == "good" or None)


def test_clean_run_passes_and_reports_every_figure():
    outcomes = [_ok(seconds=0.1 * (i + 1)) for i in range(9)] + [_ok("corrupt_image")]
    s = _summary(outcomes)
    assert s["passed"] and not s["problems"]
    r = s["requests"]
    assert (r["sent"], r["answered"], r["good"]["ok"], r["bad"]["refused_correctly"]) == (10, 10, 9, 1)
    assert s["latency_s"]["good"]["p50"] == pytest.approx(0.5)
    assert 0.85 < s["latency_s"]["good"]["p99"] <= 0.9
    text = soak.markdown(s)
    assert "**PASSED**" in text and "| good: lost | 0 |" in text and "| engine | 1000 | 1000 |" in text


def test_rss_is_reported_per_minute_with_its_growth():
    samples = [{"t": t, "gateway": 200.0, "engine": 1000.0 + min(t, 120) / 2} for t in range(0, 185, 5)]
    minutes = soak.per_minute(samples)
    assert [m["minute"] for m in minutes] == [1, 2, 3]
    assert [m["engine_growth"] for m in minutes] == [30.0, 30.0, 0.0]  # levels off after two minutes
    s = _summary([_ok()])
    s["rss_mib"]["per_minute"] = minutes
    assert "| 3 | 1060 | +0 | 200 | +0 |" in soak.markdown(s)


def test_a_lost_good_request_a_wrong_refusal_or_memory_growth_fails_the_run():
    lost = soak.Outcome("good", True, False, 502, 1.0, "status 502")
    wrong = soak.Outcome("unknown_method", False, False, 200, 0.1, "status 200, expected 400")
    s = _summary([_ok(), lost, wrong], engine_end=1400.0)
    assert not s["passed"]
    joined = "; ".join(s["problems"])
    assert "1 good requests lost" in joined and "1 bad requests not refused" in joined
    assert "engine RSS grew 400 MiB, over the bound of 300 MiB" in joined
    assert s["requests"]["failures_by_class"] == {"bad/unknown_method: status 200, expected 400": 1,
                                                  "good: status 502": 1}
    assert "**FAILED**" in soak.markdown(s)


def test_mix_is_seeded_and_has_its_share_of_bad_requests():
    questions = [soak.Question("data:image/png;base64,AAAA", "what colour is the circle ?", "red")]
    plans = [soak.Mix("demo", ["fastervlm", "pool"], questions, bad_share=0.25, stream_share=0.5, max_tokens=4,
                      seed=3) for _ in range(2)]
    a, b = ([m.next() for _ in range(400)] for m in plans)
    assert [(p.kind, p.stream, p.headers) for p in a] == [(p.kind, p.stream, p.headers) for p in b]
    bad = [p for p in a if p.kind != "good"]
    assert 0.18 < len(bad) / len(a) < 0.32 and {p.kind for p in bad} == set(soak.BAD_KINDS)
    assert all(p.expect_status == 400 for p in bad) and 0.4 < sum(p.stream for p in a) / len(a) < 0.6


@pytest.mark.slow
def test_a_short_real_soak_passes_and_writes_its_results(tmp_path):
    """A few seconds of 4 clients against `vlmprune serve --model demo`: exit 0, nothing lost."""
    cmd = [sys.executable, str(SOAK), "--clients", "4", "--duration", "6", "--warmup", "3", "--startup-timeout", "1200",
           "--out", str(tmp_path), "--tag", "smoke"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.loads((tmp_path / "smoke.json").read_text())
    assert s["passed"] and s["requests"]["good"]["sent"] > 0 and s["requests"]["good"]["lost"] == 0
    assert s["requests"]["sent"] == s["requests"]["answered"]
    assert s["rss_mib"]["start"]["engine"] > 0 and s["serve_exit_code"] == 0
    assert "**PASSED**" in (tmp_path / "smoke.md").read_text()
