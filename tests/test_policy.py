"""Policy validation and the single kept-count function."""

import pytest

from vlmprune.methods import METHODS, require_support
from vlmprune.policy import (
    METHOD_NAMES,
    RATIO_STEP,
    AIMPolicy,
    FasterVLMPolicy,
    PolicyError,
    bucket_ratio,
    kept_count,
    parse_policy,
)


@pytest.mark.parametrize("ratio,expected", [(0.0, 576), (0.75, 144), (0.9, 58), (0.95, 29)], ids=str)
def test_fastervlm_counts_on_576(ratio, expected):
    """FasterVLM's published counts on 576 tokens: 144 / 58 / 29 at 0.75 / 0.9 / 0.95."""
    assert kept_count(576, ratio) == expected


def test_kept_count_rounds_half_up_and_keeps_one():
    """Round half up (also where binary floats land just below the half), never below one token."""
    assert kept_count(10, 0.35) == 7  # 6.5 -> 7, although 10 * (1 - 0.35) < 6.5 in floats
    assert kept_count(6, 0.25) == 5  # 4.5 -> 5
    assert kept_count(4, 0.99) == 1
    assert kept_count(1, 0.9) == 1
    assert kept_count(0, 0.5) == 0


@pytest.mark.parametrize("n", [1, 7, 64, 576, 2880])
def test_kept_count_bounds_and_monotone(n):
    """Counts stay in [1, n] and never grow with the ratio."""
    prev = n
    for step in range(0, 200):
        ratio = step * RATIO_STEP
        k = kept_count(n, ratio)
        assert 1 <= k <= n
        assert k <= prev
        prev = k


@pytest.mark.parametrize("bad", [-1, 3.5])
def test_kept_count_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        kept_count(10, bad) if bad > 1 else kept_count(bad, 0.5)


def test_parse_defaults_and_every_method():
    """Every method name parses to its own policy type with ratio 0 by default."""
    assert parse_policy() == FasterVLMPolicy()
    for name in METHOD_NAMES:
        policy = parse_policy({"method": name, "ratio": "0.5"})
        assert policy.method == name and policy.ratio == 0.5
        assert isinstance(policy, METHODS[name].policy_type)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"method": "sparsevlm"}, "unknown method 'sparsevlm'"),
        ({"ratio": 1.0}, "'ratio'"),
        ({"ratio": -0.1}, "'ratio'"),
        ({"ratio": "abc"}, "must be a number"),
        ({"ratio": float("nan")}, "finite"),
        ({"ratio": True}, "not a boolean"),
        ({"method": "aim", "pagerank_iterations": 0}, "'pagerank_iterations'"),
        ({"method": "random", "sigma": 1}, "unknown option 'sigma'"),
        ({"method": "globalcom2", "temperature": 0}, "'temperature'"),
        ({"method": "fastv", "K": 2}, "unknown option 'K' for method 'fastv'"),
        ({"method": "fastv", "probe_layers": 2}, "unknown option 'probe_layers'"),
        ({"method": "fastv", "layer": 0}, "'layer'"),
        ({"method": "fastv", "query": "first"}, "'query'"),
        ({"method": "fastv", "ratio": 1.0}, "'ratio'"),
    ],
    ids=lambda x: str(x)[:30],
)
def test_invalid_policies_name_the_problem(data, needle):
    """Bad policies raise PolicyError (a ValueError) whose message names the field or method."""
    with pytest.raises(PolicyError, match=None) as info:
        parse_policy(data)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_ratio_buckets_and_overrides():
    """Ratios snap to the documented step; overrides apply on top of an existing policy."""
    assert bucket_ratio(0.9012) == 0.9
    assert bucket_ratio(0.9999) == 1 - RATIO_STEP
    assert parse_policy({"ratio": 0.7512}).ratio == 0.75
    base = AIMPolicy(ratio=0.5)
    assert parse_policy(base, ratio=0.8) == AIMPolicy(ratio=0.8)


def test_unsupported_method_model_pair_names_both():
    """GlobalCom2 needs AnyRes: asking for it on LLaVA-1.5 names the method and the family."""
    with pytest.raises(PolicyError) as info:
        require_support("globalcom2", "llava")
    assert "globalcom2" in str(info.value) and "llava" in str(info.value)
    assert require_support("globalcom2", "llava_next").name == "globalcom2"


def test_fastv_policy_defaults_and_its_layer_checked_against_the_served_depth():
    """FastV defaults to the paper (K depth-scaled from 2 of 32, the last prompt token); a layer the
    served LLM does not have fails by name when the plan is made."""
    from vlmprune.reduction.stages import stage_plan

    policy = parse_policy({"method": "fastv", "ratio": 0.5})
    assert (policy.layer, policy.query) == (None, "last")
    assert stage_plan(policy, 576, 32) == [(0, 576), (2, 269)]  # 576 * (1 - 0.5 * 32 / 30) = 268.8
    assert stage_plan(policy, 12, 4) == [(0, 12), (1, 4)]  # K = 1 of 4: 12 * (1 - 0.5 * 4 / 3) = 4
    assert stage_plan(parse_policy(policy, layer=3), 12, 4) == [(0, 12), (3, 0)]  # 0.5 * 4 / 1 > 1: clamped
    with pytest.raises(PolicyError, match=r"field 'layer'.*\[1, 3\].*got 4"):
        stage_plan(parse_policy(policy, layer=4), 12, 4)


def test_method_traits_give_each_route(monkeypatch):
    """The routes follow from MethodSpec's traits alone: on the in-LLM route (the default) transprune,
    aim and fastv run between the decoder layers; on the probe route fastv (no at-input variant) is
    refused and transprune / aim / explain are probe-scored; the plugin's sets are the same traits.
    explain on the in-LLM route: its one choice at layer 0 (``MethodSpec.in_llm``)."""
    from vlmprune.methods import served_route
    from vlmprune.vllm_plugin.request_policy import INLLM_ONLY_METHODS, PROBE_METHODS

    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)
    monkeypatch.delenv("VLMPRUNE_IN_LLM", raising=False)
    assert {name for name, spec in METHODS.items() if not spec.at_input} == {"fastv"} == set(INLLM_ONLY_METHODS)
    assert {name for name, spec in METHODS.items() if spec.probe} == {"transprune", "aim", "explain"} == set(PROBE_METHODS)
    assert {m: served_route(m, "llava") for m in ("transprune", "aim", "fastv", "explain", "fastervlm")} == {
        "transprune": "in_llm", "aim": "in_llm", "fastv": "in_llm", "explain": "in_llm", "fastervlm": "pre_llm"}
    assert served_route("globalcom2", "llava") == "refused" and served_route("globalcom2", "llava_next") == "pre_llm"
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    assert {m: served_route(m, "qwen2_vl") for m in ("transprune", "aim", "fastv", "explain")} == {
        "transprune": "probe", "aim": "probe", "fastv": "refused", "explain": "probe"}
    monkeypatch.setenv("VLMPRUNE_ROUTE", "sideways")
    with pytest.raises(ValueError, match="VLMPRUNE_ROUTE must be one of in_llm, probe, got 'sideways'"):
        served_route("aim", "llava")