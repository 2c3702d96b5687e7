"""Header parsing, precedence between named policy / body / headers, and the load-adaptive ratio."""

from __future__ import annotations

import pytest

from server.policies import (
    BUILTIN_POLICIES,
    LoadAdapter,
    NamedPolicy,
    PoliciesConfig,
    load_policies,
    resolve_policy,
)
from vlmprune.policy import PolicyError

H = {"X-VLMPrune-Method": "pool", "X-VLMPrune-Ratio": "0.9"}


def test_default_named_policy_applies_without_headers():
    """No header, no body: the server default (balanced: fastervlm at 0.75, adaptive, pressure 0)."""
    r = resolve_policy({}, None, BUILTIN_POLICIES, "llava")
    assert (r.name, r.method, r.ratio, r.ratio_source) == ("balanced", "fastervlm", 0.75, "adaptive")
    assert r.instruction is None  # pre-LLM method: the instruction is not sent


def test_instruction_is_attached_only_for_the_probe_methods(monkeypatch):
    """Probe-scored methods get the chat's instruction; on the in-LLM route (the default) the
    methods it runs between decoder layers (explain's layer-0 choice included) do not: they read the
    prompt's own instruction rows."""
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    for method in ("transprune", "aim", "explain"):
        r = resolve_policy({"X-VLMPrune-Method": method}, None, BUILTIN_POLICIES, "llava", instruction="q ?")
        assert r.instruction == "q ?", method
    monkeypatch.delenv("VLMPRUNE_ROUTE", raising=False)  # the default route: in-LLM
    for method, want in (("transprune", None), ("aim", None), ("fastv", None), ("explain", None)):
        r = resolve_policy({"X-VLMPrune-Method": method}, None, BUILTIN_POLICIES, "llava", instruction="q ?")
        assert r.instruction == want, method
        r = resolve_policy({}, {"method": method, "instruction": "body"}, BUILTIN_POLICIES, "llava")
        assert r.instruction == (None if want is None else "body"), method


def test_named_policy_header_selects_the_policy():
    """X-VLMPrune-Policy picks a policy from the file."""
    r = resolve_policy({"X-VLMPrune-Policy": "quality"}, None, BUILTIN_POLICIES, "llava")
    assert (r.name, r.ratio) == ("quality", 0.5)


def test_headers_are_case_insensitive_via_lowercase_lookup():
    """Starlette lower-cases header names; both spellings work."""
    r = resolve_policy({"x-vlmprune-ratio": "0.3"}, None, BUILTIN_POLICIES, "llava")
    assert r.ratio == 0.3 and r.ratio_source == "header"


def test_body_overrides_named_policy_and_headers_override_body():
    """Precedence: named policy < body < headers; the ratio is bucketed to 0.005."""
    body = {"method": "random", "ratio": 0.4, "seed": 7}
    r = resolve_policy({}, body, BUILTIN_POLICIES, "llava")
    assert (r.method, r.ratio, r.policy.seed, r.ratio_source) == ("random", 0.4, 7, "body")
    r = resolve_policy({"X-VLMPrune-Ratio": "0.8312"}, body, BUILTIN_POLICIES, "llava")
    assert (r.method, r.ratio, r.policy.seed, r.ratio_source) == ("random", 0.83, 7, "header")


def test_header_method_switch_drops_options_of_the_old_method_keeps_ratio():
    """A header that changes the method drops the body's options (they belong to the old method)."""
    r = resolve_policy({"X-VLMPrune-Method": "pool"}, {"method": "random", "ratio": 0.4, "seed": 7},
                       BUILTIN_POLICIES, "llava")
    assert (r.method, r.ratio) == ("pool", 0.4)
    assert "seed" not in r.processor_kwargs()


def test_body_instruction_is_kept_and_gateway_instruction_fills_in(monkeypatch):
    """Probe-scored methods get the body's instruction, else the gateway's extraction (probe route)."""
    monkeypatch.setenv("VLMPRUNE_ROUTE", "probe")
    r = resolve_policy({}, {"method": "transprune", "ratio": 0.5, "instruction": "from body"}, BUILTIN_POLICIES,
                       "llava", instruction="from chat")
    assert r.processor_kwargs()["instruction"] == "from body"
    r = resolve_policy({"X-VLMPrune-Method": "explain"}, None, BUILTIN_POLICIES, "llava", instruction="from chat")
    assert r.processor_kwargs()["instruction"] == "from chat"


@pytest.mark.parametrize(
    "headers, body, needle",
    [
        ({"X-VLMPrune-Ratio": "abc"}, None, "X-VLMPrune-Ratio"),
        ({"X-VLMPrune-Ratio": "1.0"}, None, "X-VLMPrune-Ratio"),
        ({"X-VLMPrune-Ratio": "-0.1"}, None, "X-VLMPrune-Ratio"),
        ({"X-VLMPrune-Ratio": "nan"}, None, "X-VLMPrune-Ratio"),
        ({"X-VLMPrune-Ratio": " "}, None, "X-VLMPrune-Ratio"),
        ({"X-VLMPrune-Method": "nope"}, None, "'nope'"),
        ({"X-VLMPrune-Policy": "turbo"}, None, "'turbo'"),
        ({"X-VLMPrune-Method": "globalcom2"}, None, "'llava'"),
        ({}, {"method": "random", "ratio": "x"}, "'ratio'"),
        ({}, {"method": "random", "bogus": 1}, "'bogus'"),
        ({}, {"method": "random", "instruction": 3}, "instruction"),
        ({}, [1, 2], "vlmprune"),
    ],
    ids=["ratio-nan-text", "ratio-1", "ratio-neg", "ratio-nan", "ratio-blank", "method", "policy",
         "method-model", "body-ratio", "body-option", "body-instruction", "body-type"],
)
def test_bad_input_raises_policy_error_naming_it(headers, body, needle):
    """Every bad header or body field is a PolicyError whose message names it."""
    with pytest.raises(PolicyError) as exc:
        resolve_policy(headers, body, BUILTIN_POLICIES, "llava")
    assert needle in str(exc.value)


def test_globalcom2_fits_llava_next():
    """The same header that fails on LLaVA-1.5 is fine on LLaVA-NeXT; text-only skips the check."""
    assert resolve_policy({"X-VLMPrune-Method": "globalcom2"}, None, BUILTIN_POLICIES, "llava_next").method == "globalcom2"
    assert resolve_policy({"X-VLMPrune-Method": "globalcom2"}, None, BUILTIN_POLICIES, None).method == "globalcom2"


def test_adaptive_ratio_follows_pressure_only_for_named_ratios():
    """balanced (0.75..0.9): pressure 1 -> 0.9, 0.5 -> 0.825; an explicit ratio never moves."""
    assert resolve_policy({}, None, BUILTIN_POLICIES, "llava", pressure=1.0).ratio == 0.9
    r = resolve_policy({}, None, BUILTIN_POLICIES, "llava", pressure=0.5)
    assert (r.ratio, r.ratio_source) == (0.825, "adaptive")
    assert resolve_policy({"X-VLMPrune-Ratio": "0.6"}, None, BUILTIN_POLICIES, "llava", pressure=1.0).ratio == 0.6
    assert resolve_policy({}, {"ratio": 0.2}, BUILTIN_POLICIES, "llava", pressure=1.0).ratio == 0.2
    assert resolve_policy({"X-VLMPrune-Policy": "quality"}, None, BUILTIN_POLICIES, "llava", pressure=1.0).ratio == 0.5


def test_load_adapter_rises_when_saturated_falls_when_calm_holds_in_between():
    """Queue or TTFT over target raises pressure by `step`; below low-water lowers it; else holds."""
    a = LoadAdapter(queue_target=4, ttft_target_s=2.0, step=0.25, low_water=0.5)
    assert a.update(4, None) == 0.25  # queue at target
    assert a.update(0, 3.0) == 0.5  # TTFT over target
    assert a.update(1000, 100) == 0.75
    assert a.update(9, None) == 1.0
    assert a.update(9, None) == 1.0  # clamped
    assert a.update(3, 1.5) == 1.0  # between low-water and target: hold
    assert a.update(1, 0.5) == 0.75  # calm
    for _ in range(5):
        a.update(0, None)
    assert a.pressure == 0.0


def test_policies_file_yaml_and_errors(tmp_path):
    """A YAML file loads and is validated; bad entries name the file and the field."""
    good = tmp_path / "p.yaml"
    good.write_text("default: cheap\npolicies:\n  cheap: {method: random, ratio: 0.5, max_ratio: 0.8, options: {seed: 3}}\n")
    cfg = load_policies(good)
    assert cfg.policies["cheap"].ratio_at(1.0) == 0.8
    assert resolve_policy({}, None, cfg, "llava").policy.seed == 3
    for text, needle in [
        ("default: x\npolicies: {a: {method: pool, ratio: 0.5}}\n", "'x'"),
        ("default: a\npolicies: {a: {method: pool, ratio: 0.5, max_ratio: 0.2}}\n", "max_ratio"),
        ("default: a\npolicies: {a: {method: pool, ratio: 0.5, options: {seed: 1}}}\n", "'seed'"),
        ("default: a\npolicies: {a: {method: nope, ratio: 0.5}}\n", "'nope'"),
        ("default: [a\n", "YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError) as exc:
            load_policies(bad)
        assert needle in str(exc.value) and "bad.yaml" in str(exc.value)


def test_shipped_policies_file_matches_builtin():
    """deploy/policies.yaml is the built-in set (what the container and compose use)."""
    from pathlib import Path

    shipped = load_policies(Path(__file__).resolve().parents[2] / "deploy" / "policies.yaml")
    assert shipped == BUILTIN_POLICIES


def test_named_policy_rejects_bad_ratio():
    with pytest.raises(ValueError):
        NamedPolicy(method="pool", ratio=1.2)
    with pytest.raises(ValueError):
        PoliciesConfig(default="a", policies={})
