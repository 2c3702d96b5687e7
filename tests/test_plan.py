"""The one plan per image (``vlmprune.reduction.plan``): every method x family x route, table-driven.

Expectations are computed from the layer below (``core.schedule``'s scaled schedules and
``policy.kept_count``), not from the plan: the pre-LLM routes keep ``kept_count`` of every view; the
reference route enters the LLM with the schedule's first stage and prunes at the others; the in-LLM
route gives every decoder layer the reference's count (TransPrune's input stage and explain's one
choice at layer 0)."""

from __future__ import annotations

import pytest

from vlmprune.core import schedule
from vlmprune.methods import METHODS, MODEL_FAMILIES, served_route
from vlmprune.policy import kept_count, parse_policy
from vlmprune.reduction.plan import plan_image, request_stages
from vlmprune.reduction.stages import progressive_schedule

LAYERS = 12
VIEWS = {"llava": (576,), "llava_next": (576, 480, 480, 0), "qwen2_vl": (391,), "qwen2_5_vl": (391,)}
FIXED = {"llava": 0, "llava_next": 40, "qwen2_vl": 0, "qwen2_5_vl": 0}
CASES = [(m, f, r) for m, spec in METHODS.items() for f in spec.models for r in (0.0, 0.5, 0.9)]


def schedule_counts(policy, n: int) -> list[tuple[int, int]]:
    """(layer, kept) of the scaled paper schedule, the input stage (layer 0) first."""
    counts = schedule.stage_counts(progressive_schedule(policy, LAYERS), n)
    return counts if counts and counts[0][0] == 0 else [(0, n), *counts]


def reference_per_layer(policy, views: tuple[int, ...]) -> list[int]:
    n = sum(views)
    if policy.ratio == 0:
        return [n] * LAYERS
    if METHODS[policy.method].stage == "in_llm":
        return schedule.counts_per_layer(schedule_counts(policy, n), n, LAYERS)
    return [sum(kept_count(v, policy.ratio) for v in views)] * LAYERS


@pytest.mark.parametrize("method,family,ratio", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("route", ["reference", "in_llm", "probe", "pre_llm"])
def test_plan_counts_and_stages(method, family, ratio, route):
    policy = parse_policy({"method": method, "ratio": ratio})
    views, fixed = VIEWS[family], FIXED[family]
    n = sum(views)
    spec = METHODS[method]
    if route == "in_llm" and not spec.in_llm and ratio > 0:
        route = "pre_llm" if not spec.probe else "probe"  # what a non-progressive method is served as
    plan = plan_image(policy, family, views, LAYERS, fixed=fixed, route=route)
    assert plan.prunable == n and plan.fixed == fixed and plan.prompt_tokens == plan.entering + fixed
    if ratio == 0:
        assert plan.route == "none" and plan.entering == n and plan.stages == () and plan.per_layer() == [n] * LAYERS
        return
    per_view = sum(kept_count(v, ratio) for v in views)
    if route in ("probe", "pre_llm"):
        assert plan.entering == per_view and plan.stages == () and plan.per_layer() == [per_view] * LAYERS
        return
    # reference and in-LLM: every decoder layer sees the reference's count
    assert plan.per_layer() == reference_per_layer(policy, views)
    if spec.stage != "in_llm" and route == "in_llm":  # explain: all enter, its one choice at layer 0
        assert plan.entering == n and plan.stages == ((0, per_view),) and plan.final == per_view
        return
    if spec.stage != "in_llm":
        assert plan.entering == per_view and plan.stages == ()
        return
    counts = schedule_counts(policy, n)
    assert [c for _, c in plan.stages] == sorted((c for _, c in plan.stages), reverse=True)
    if route == "in_llm" and method == "transprune":
        assert plan.entering == n  # its input stage is scored at layer 0, on every row
        assert (plan.stages[0] == (0, counts[0][1])) == (counts[0][1] < n)
        later = [layer for layer, _ in plan.stages if layer > 0]
        assert plan.window == (later[0] - 1, later[-1] - 1)
    else:
        assert plan.entering == counts[0][1] and all(layer > 0 for layer, _ in plan.stages)
    assert plan.final == counts[-1][1]


def test_the_route_is_how_this_process_serves_the_method(monkeypatch):
    """``route=None`` is ``methods.served_route``: in-LLM by default, the probe on request."""
    image = ((576,), 0)
    for env, want in ((None, {"transprune": "in_llm", "aim": "in_llm", "fastv": "in_llm", "explain": "in_llm",
                              "fastervlm": "pre_llm", "pool": "pre_llm"}),
                      ("probe", {"transprune": "probe", "aim": "probe", "fastv": "refused", "explain": "probe",
                                 "fastervlm": "pre_llm"})):
        if env is None:
            monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
        else:
            monkeypatch.setenv("VLMPRUNE_ROUTE", env)
        for method, route in want.items():
            plan = plan_image(parse_policy({"method": method, "ratio": 0.9}), "llava", *image[:1], LAYERS)
            assert plan.route == route == served_route(method, "llava"), method
    assert plan_image(None, "llava", 576, LAYERS).route == "none"


def test_request_stages_share_the_layers_and_fill_images_that_lose_nothing():
    """Images of one request share their schedule's layers; an image too small for a stage to remove
    anything keeps what entered (its own plan has no stage)."""
    policy = parse_policy({"method": "fastv", "ratio": 0.5})
    big, small = (plan_image(policy, "llava", n, 4, route="in_llm") for n in (100, 1))
    assert big.stages and not small.stages
    assert request_stages([big, small]) == [(layer, [count, 1]) for layer, count in big.stages]
    assert request_stages([small]) == []
    tp = parse_policy({"method": "transprune", "ratio": 0.9})
    plans = [plan_image(tp, "llava", n, LAYERS, route="in_llm") for n in (576, 100)]
    got = request_stages(plans)
    assert [layer for layer, _ in got] == [layer for layer, _ in plans[0].stages]
    assert [counts for _, counts in got] == [[a, b] for (_, a), (_, b) in zip(plans[0].stages, plans[1].stages)]


def test_explain_in_llm_enters_whole_and_keeps_the_reference_count_from_layer_0():
    """Explain on the in-LLM route: every prunable token is a placeholder (the stage scores with layer
    0's attention over the whole prompt), one stage at layer 0 keeps what the reference keeps at the
    LLM input, per view budgeted; so every decoder layer sees the reference's count. A ratio too
    small to remove a token plans no stage."""
    policy = parse_policy({"method": "explain", "ratio": 0.75})
    for family in MODEL_FAMILIES:
        views = VIEWS[family]
        plan = plan_image(policy, family, views, LAYERS, fixed=FIXED[family], route="in_llm")
        ref = plan_image(policy, family, views, LAYERS, fixed=FIXED[family], route="reference")
        assert plan.entering == sum(views) and plan.prompt_tokens == sum(views) + FIXED[family]
        assert plan.stages == ((0, ref.entering),) and plan.per_layer() == ref.per_layer()
    tiny = plan_image(parse_policy({"method": "explain", "ratio": 0.01}), "llava", 36, 4, route="in_llm")
    assert tiny.route == "in_llm" and tiny.entering == 36 and tiny.stages == ()
    assert request_stages([tiny]) == []


def test_every_family_is_planned():
    assert {f for _, f, _ in CASES} == set(MODEL_FAMILIES)
