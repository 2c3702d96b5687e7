"""The policy on the wire (``vlmprune.wire``): the gateway's mapping is what the plugin parses, the
byte form round-trips, and each distinct value is validated once per process."""

from __future__ import annotations

import pytest

from vlmprune import wire
from vlmprune.policy import PolicyError, parse_policy


def test_the_gateways_value_is_what_the_plugin_reads():
    policy = parse_policy({"method": "aim", "ratio": 0.5, "merge_keep": 0.3})
    value = wire.request_value(policy, instruction="what colour", trace="run-0001")
    got = wire.parse_request(value)
    assert got == wire.RequestPolicy(policy, "what colour", "run-0001") and got.active
    assert wire.parse_request(wire.request_value(policy)).instruction is None


def test_policy_bytes_round_trip_and_are_parsed_once():
    policy = parse_policy({"method": "fastv", "ratio": 0.9, "layer": 2})
    raw = wire.policy_bytes(policy)
    assert raw == wire.policy_bytes(parse_policy({"ratio": 0.9, "layer": 2, "method": "fastv"}))  # canonical
    assert wire.policy_from_bytes(raw) == policy
    assert wire.policy_from_bytes(bytes(raw)) is wire.policy_from_bytes(raw)  # one parse per payload
    assert wire.policy_bytes(None) == b"" and wire.policy_from_bytes(b"") is None


def test_a_request_value_is_validated_once_per_distinct_value():
    a = wire.parse_request({"method": "random", "ratio": 0.5, "seed": 3})
    assert wire.parse_request({"seed": 3, "ratio": 0.5, "method": "random"}) is a
    assert wire.parse_request('{"method": "random", "ratio": 0.5, "seed": 3}') is a  # a command-line default
    assert wire.parse_request({"method": "random", "ratio": 0.5, "seed": 4}) is not a
    assert wire.parse_request(None) == wire.parse_request("null") == wire.RequestPolicy()


@pytest.mark.parametrize("bad,message", [
    ("not json", "must be a mapping"),
    ([1, 2], "must be a mapping, got list"),
    ({"method": "fastervlm", "instruction": 3}, "field 'instruction'"),
    ({"method": "fastervlm", "trace": "../x"}, "trace id"),
    ({"method": "nope"}, "unknown method 'nope'"),
])
def test_bad_values_are_refused_every_time(bad, message):
    for _ in range(2):  # a refusal is not cached away
        with pytest.raises(PolicyError, match=message):
            wire.parse_request(bad)
