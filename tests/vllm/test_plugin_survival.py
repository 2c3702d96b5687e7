"""No request can stop the engine: one real vLLM CPU engine (the default route's settings), every
refusable request sent between two good ones, and a scorer that fails inside the worker.

An exception in vLLM's worker stops the engine core for every request, so the plugin refuses what a
request can get wrong in the processor (a ``PolicyError``: vLLM's server answers 400) and serves an
image whose scoring still fails in the worker with the documented fallback selection
(:mod:`vlmprune.vllm_plugin.fallback`). Each good request after a bad one must get the first good
answer again (same tokens and logprobs): the engine is alive and its caches are unharmed.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import (
    IN_LLM_ENGINE,
    IN_LLM_ENV_VARS,
    Engine,
    assert_same_output,
    build_model,
    chat_spec,
    saved_env,
)
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.policy import PolicyError
from vlmprune.trace import TRACE_DIR_ENV
from vlmprune.vllm_plugin.fallback import read_failures

pytestmark = pytest.mark.slow

QUESTION = "what colour is the box ?"
IMAGE = (96, 64, 1)


@pytest.fixture(scope="module")
def env(tmp_path_factory, timings):
    root = tmp_path_factory.mktemp("survival")
    model_dir, _model, processor = build_model("llava", root)
    torch.manual_seed(0)
    cnn = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval()
    cnn.save(root / "good_cnn.pt")
    with torch.no_grad():  # finite weights whose activations overflow float32: NaN relevance in the worker
        for p in cnn.parameters():
            p.mul_(1e30)
    cnn.save(root / "overflowing_cnn.pt")
    with torch.no_grad():
        next(cnn.parameters()).fill_(float("nan"))
    cnn.save(root / "nan_cnn.pt")
    (root / "corrupt_cnn.pt").write_bytes(b"not a checkpoint")
    traces = root / "traces"
    traces.mkdir()
    with saved_env({**IN_LLM_ENV_VARS, TRACE_DIR_ENV: str(traces)}):
        engine = Engine(model_dir, **IN_LLM_ENGINE)
        timings["survival_engine_start_s"] = engine.start_s
        try:
            good = [chat_spec(processor, QUESTION, [IMAGE]),
                    chat_spec(processor, QUESTION, [IMAGE], policy={"method": "transprune", "ratio": 0.75})]
            yield SimpleNamespace(engine=engine, processor=processor, root=root, traces=traces, good=good,
                                  answers=engine.run(good))
        finally:
            engine.shutdown()


def spec(env, policy, prompt: str = QUESTION, preamble: str | None = None) -> dict:
    return chat_spec(env.processor, prompt, [IMAGE], policy=policy, preamble=preamble)


REFUSED = {
    "not-a-mapping": (lambda env: spec(env, 5), r"must be a mapping"),
    "unknown-method": (lambda env: spec(env, {"method": "nope", "ratio": 0.5}), r"unknown method 'nope'"),
    "ratio-above-1": (lambda env: spec(env, {"method": "pool", "ratio": 1.5}), r"ratio"),
    "unknown-field": (lambda env: spec(env, {"method": "pool", "ratio": 0.5, "bogus": 1}), r"bogus"),
    "method-misfits-family": (lambda env: spec(env, {"method": "globalcom2", "ratio": 0.5}), r"globalcom2"),
    "bad-trace-id": (lambda env: spec(env, {"method": "pool", "ratio": 0.5, "trace": "../x"}), r"trace"),
    "probe-too-deep": (lambda env: spec(env, {"method": "explain", "ratio": 0.5, "instruction": QUESTION,
                                              "checkpoint": str(env.root / "good_cnn.pt"), "probe_layers": 99}),
                       r"probe_layers|layers"),
    "missing-checkpoint": (lambda env: spec(env, {"method": "explain", "ratio": 0.5, "instruction": QUESTION,
                                                  "checkpoint": str(env.root / "no_such.pt")}), r"no such file"),
    "corrupt-checkpoint": (lambda env: spec(env, {"method": "explain", "ratio": 0.5, "instruction": QUESTION,
                                                  "checkpoint": str(env.root / "corrupt_cnn.pt")}),
                           r"not a loadable RelevanceCNN"),
    "nan-checkpoint": (lambda env: spec(env, {"method": "explain", "ratio": 0.5, "instruction": QUESTION,
                                              "checkpoint": str(env.root / "nan_cnn.pt")}), r"non-finite weights"),
    "in-llm-without-instruction": (lambda env: dict(spec(env, {"method": "transprune", "ratio": 0.5}),
                                                    text="USER: <image>"), r"instruction"),
    "in-llm-span-over-budget": (lambda env: spec(env, {"method": "fastv", "ratio": 0.5},
                                                 prompt=" ".join(["red box"] * 300)), r"max-num-batched-tokens"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_each_refusable_request_between_two_good_ones(env, case):
    """The bad request gets a PolicyError naming its problem; the good ones around it their first answers."""
    make, message = REFUSED[case]
    assert_same_output(env.engine.run_one(env.good[1]), env.answers[1], atol=0.0, what=f"good before {case}")
    with pytest.raises(PolicyError, match=message):
        env.engine.run_one(make(env))
    for s, want in zip(env.good, env.answers):
        assert_same_output(env.engine.run_one(s), want, atol=0.0, what=f"good after {case}")


def test_a_scorer_that_fails_in_the_worker_serves_the_fallback_and_the_engine_serves_on(env):
    """A relevance CNN with finite weights that overflow to NaN passes the processor's checks and
    fails in the worker (explain's stage at layer 0, the in-LLM route): the image gets the evenly
    spaced fallback (logged, in its trace's stage), the request is answered, and so is everything
    after it. (The probe route's at-input fallback: test_plugin_fallback.py / test_plugin_probe.py.)"""
    assert env.engine.llm.apply_model(read_failures) == [[]], "a fallback before this test"
    policy = {"method": "explain", "ratio": 0.75,
              "checkpoint": str(env.root / "overflowing_cnn.pt"), "trace": "survival-fallback"}
    out = env.engine.run_one(spec(env, policy))
    assert len(out["token_ids"]) > 0
    (failures,) = env.engine.llm.apply_model(read_failures)
    assert [(f["method"], f["stage"]) for f in failures] == [("explain", 0)]
    assert "NonFiniteScoresError" in failures[0]["error"]
    record = json.loads((env.traces / "survival-fallback.0.json").read_text())
    n_image = record["n_tokens"]
    assert record["input_kept"] == list(range(n_image)), "every token enters the LLM"
    assert len(out["prompt_token_ids"]) == len(env.answers[0]["prompt_token_ids"])
    kept = record["kept"]
    assert [st["kept"] for st in record["stages"]] == [kept]
    assert len(kept) == n_image // 4, "ratio 0.75 keeps a quarter of the tokens"
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert len(gaps) <= 2, f"the fallback keeps evenly spaced tokens, got gaps {sorted(gaps)}"
    for s, want in zip(env.good, env.answers):
        assert_same_output(env.engine.run_one(s), want, atol=0.0, what="good after the fallback")
    # The fallback report (what the gateway turns into fallback= in X-VLMPrune-Applied): one, for
    # this request only (the good ones after it have none), naming the method and the error.
    reports = sorted(env.traces.glob("fallback-*.json"))
    assert len(reports) == 1, reports
    (failure,) = json.loads(reports[0].read_text())["failures"].values()
    assert failure["method"] == "explain" and "NonFiniteScoresError" in failure["error"]
    reports[0].unlink()
    # The same request again: its stage scores again (in the LLM, not cached), fails again, is
    # served with the same fallback rows, and reported again.
    again = env.engine.run_one(spec(env, policy))
    assert again["token_ids"] == out["token_ids"]
    assert [f["method"] for f in env.engine.llm.apply_model(read_failures)[0]] == ["explain"]
    (report,) = env.traces.glob("fallback-*.json")
    assert "NonFiniteScoresError" in next(iter(json.loads(report.read_text())["failures"].values()))["error"]
    report.unlink()
