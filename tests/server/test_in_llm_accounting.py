"""Gateway accounting of the in-LLM methods (the default route; ``VLMPRUNE_ROUTE=probe`` for the probe): stages, placeholders, FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.chat.protocol import AppliedPolicy
from server.model_info import ServedModel
from vlmprune.flops import method_probe_flops, method_visual_per_layer, prefill_flops
from vlmprune.policy import parse_policy
from vlmprune.policy import image_kept_count
from vlmprune.reduction.stages import stage_plan

DEMO = Path(__file__).resolve().parents[2] / "vlmprune" / "testbed" / "models" / "demo"


def served_stages(policy, n: int, layers: int) -> list[tuple[int, int]]:
    """The in-LLM route's stages, from the schedule: TransPrune's input stage runs at layer 0."""
    (_, first), *later = stage_plan(policy, n, layers)
    return ([(0, first)] if policy.method == "transprune" and first < n else []) + later


@pytest.fixture
def model():
    return ServedModel(DEMO)


@pytest.mark.parametrize("method,ratio", [("transprune", 0.5), ("transprune", 0.9), ("aim", 0.75)])
def test_in_llm_requests_report_stages_and_per_layer_flops(model, monkeypatch, method, ratio):
    policy = parse_policy({"method": method, "ratio": ratio})
    image = model.image_tokens(336, 336)
    n, layers = image.prunable, model.lm.layers
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    plan = model.plan(policy, image)
    assert plan.route == "probe" and plan.stages == () and plan.entering == image_kept_count([n], ratio)
    probe_cost = model.cost([image], policy, 20, 5)

    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)  # the default route: in-LLM
    plan = model.plan(policy, image)
    stages = list(plan.stages)
    assert plan.route == "in_llm" and stages == served_stages(policy, n, layers) and stages
    assert all(c < n for _, c in stages) and [c for _, c in stages] == sorted((c for _, c in stages), reverse=True)
    want_input = n if method == "transprune" else stage_plan(policy, n, layers)[0][1]
    assert plan.entering == want_input
    cost = model.cost([image], policy, 20, 5)
    per_layer = method_visual_per_layer(method, ratio, n, layers, policy)
    probe = method_probe_flops(method, ratio, model.lm, model.vision, n, 5, 1, policy, in_llm=True)
    tower = cost.baseline_flops - prefill_flops(model.lm, 20, n).total
    assert cost.actual_flops == pytest.approx(prefill_flops(model.lm, 20, per_layer).total + tower + probe)
    assert cost.actual_flops != probe_cost.actual_flops  # no shallow-probe term, per-layer counts
    header = AppliedPolicy(method=method, ratio=ratio, visual_tokens=n, kept=want_input, policy="p", source="body",
                           stages=",".join(f"{a}:{b}" for a, b in stages)).header()
    parsed = AppliedPolicy.parse(header)
    assert parsed.stages == ",".join(f"{a}:{b}" for a, b in stages)


def test_other_methods_and_ratio_zero_have_no_stages(model, monkeypatch):
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)  # the default route: in-LLM
    image = model.image_tokens(336, 336)
    for policy in (parse_policy({"method": "fastervlm", "ratio": 0.9}), parse_policy({"method": "transprune", "ratio": 0.0})):
        plan = model.plan(policy, image)
        assert plan.stages == () and plan.route != "in_llm"
        assert plan.entering == image_kept_count([image.prunable], policy.ratio)
    assert "stages" not in AppliedPolicy(method="x", ratio=0.5, visual_tokens=1, kept=1, policy="p", source="b").header()


DEMO_NEXT = DEMO.parent / "demo-next"


@pytest.mark.parametrize("method,ratio", [("transprune", 0.9), ("aim", 0.5), ("fastv", 0.5)])
def test_llava_next_stages_follow_each_images_size_and_keep_newlines(method, ratio, monkeypatch):
    """LLaVA-NeXT (the engine's in-LLM stages on the per-image prunable count): each image's stages
    come from its own prunable count; newline tokens enter every layer, in the FLOPs too."""
    model = ServedModel(DEMO_NEXT)
    assert model.family == "llava_next"
    policy = parse_policy({"method": method, "ratio": ratio})
    images = [model.image_tokens(672, 336), model.image_tokens(500, 500)]
    assert images[0].prunable != images[1].prunable and all(t.newline for t in images)
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)  # the default route: in-LLM
    layers = model.lm.layers
    for image in images:
        plan = model.plan(policy, image)
        assert list(plan.stages) == served_stages(policy, image.prunable, layers) and plan.route == "in_llm"
        want_input = image.prunable if method != "aim" else stage_plan(policy, image.prunable, layers)[0][1]
        assert plan.entering == want_input and plan.fixed == image.newline
    cost = model.cost(images, policy, 20, 5)
    per_layer = [
        sum(c + t.newline for c, t in zip(counts, images))
        for counts in zip(*(method_visual_per_layer(method, ratio, t.prunable, layers, policy) for t in images))
    ]
    baseline_tokens = sum(t.total for t in images)
    tower = cost.baseline_flops - prefill_flops(model.lm, 20, baseline_tokens).total
    probe = sum(method_probe_flops(method, ratio, model.lm, model.vision, t.prunable, 5, t.views, policy, in_llm=True)
                for t in images)
    assert cost.actual_flops == pytest.approx(prefill_flops(model.lm, 20, per_layer).total + tower + probe)
    assert cost.visual_kept == sum(model.plan(policy, t).entering for t in images)
