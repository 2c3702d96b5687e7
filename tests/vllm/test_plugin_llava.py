"""The vLLM plugin on a tiny LLaVA-1.5 (36 visual tokens per image), in a real vLLM CPU engine.

Every engine here runs chunked prefill with ``max_num_batched_tokens=32``, so each image's 36
placeholders are split over prefill chunks in every test (the comparisons against the transformers
backend, which never chunks, therefore also prove chunked prefill of pruned images).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_helpers import ROUTE_PROBE, Engine, StockRun, assert_same_output, build_model, hf_request, median_latency, saved_env, spec

from vlmprune.policy import kept_count, parse_policy

pytestmark = pytest.mark.slow

IMG_A = (96, 64, 1)
IMG_B = (64, 96, 2)
TWO = (IMG_A, IMG_B)
N_VISUAL = 36  # 84 px / patch 14 -> 6 x 6
STOCK_SPECS = [spec(), spec(prompt="which colour is the box ?", images=TWO)]


@pytest.fixture(scope="module")
def env(tmp_path_factory, timings):
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    root = tmp_path_factory.mktemp("llava_vllm")
    model_dir, model, processor = build_model("llava", root)
    stock = StockRun(model_dir, STOCK_SPECS, root)
    with saved_env(ROUTE_PROBE):  # transprune / aim at the LLM input (in-LLM route: test_plugin_inllm.py)
        try:
            engine = Engine(model_dir)
        except BaseException:
            stock.stop()
            raise
        timings["plugin_engine_start_s"] = engine.start_s
        yield SimpleNamespace(engine=engine, stock=stock, ref=ReferenceBackend(model, processor), tokenizer=processor.tokenizer)
        engine.shutdown()
        stock.stop()


def image_token_id(env) -> int:
    return env.tokenizer.convert_tokens_to_ids("<image>")


def test_ratio0_and_no_policy_match_stock_vllm_token_for_token(env, timings):
    """No key, ``vlmprune: None`` and ratio 0 (any method) give stock vLLM's exact output."""
    stock = env.stock.result()
    timings["stock_engine_start_s"] = stock["start_s"]
    for policy in ("absent", None, {"method": "fastervlm", "ratio": 0.0}, {"method": "random", "ratio": 0}):
        for base, want in zip(STOCK_SPECS, stock["outputs"]):
            got = env.engine.run_one(dict(base, **({} if policy == "absent" else {"vlmprune": policy})))
            assert_same_output(got, want, atol=1e-6, what=f"policy={policy}")


# aim (merge + probe pruning to kept_count) is checked in test_plugin_probe.py: its vLLM count is not
# the reference backend's LLM-input count (the first stage of its in-LLM schedule).
@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_prompt_equals_reference_backend_sequence(env, method):
    """The pruned prompt (text + kept placeholders, two images) is the reference backend's, for every ratio."""
    ratios = (0.25, 0.5, 0.9)
    specs = [spec(prompt="which colour is the box ?", images=TWO, policy={"method": method, "ratio": r}) for r in ratios]
    outs = env.engine.run(specs)
    for r, s, out in zip(ratios, specs, outs):
        pre = env.ref.prefill([hf_request(s)], parse_policy(s["vlmprune"]))[0]
        assert out["prompt_token_ids"] == pre.sequence.input_ids.tolist(), f"{method} ratio {r}"
        n_image = out["prompt_token_ids"].count(image_token_id(env))
        assert n_image == pre.kept_tokens
        if method != "aim":  # aim's input count comes from its layer schedule
            assert n_image == 2 * kept_count(N_VISUAL, r)


@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_pruned_output_matches_reference_backend(env, method, ratio):
    """Same kept (or pooled) tokens as the transformers backend -> same greedy tokens, close logprobs.

    ``aim`` is not compared: vLLM never loads the last ViT layer, whose keys the transformers
    backend merges by (documented deviation); its counts are checked above."""
    s = spec(prompt="which colour is the box ?", images=TWO, policy={"method": method, "ratio": ratio})
    got = env.engine.run_one(s)
    policy = parse_policy(s["vlmprune"])
    want = env.ref.generate([hf_request(s)], policy, max_new_tokens=len(got["token_ids"]))[0]
    assert got["token_ids"][: len(want.token_ids)] == want.token_ids
    logp = torch.log_softmax(env.ref.prefill([hf_request(s)], policy)[0].logits.float(), dim=-1)
    for token, value in got["logprobs"][0].items():
        assert abs(value - float(logp[int(token)])) < 1e-3, f"token {token}"
    if ratio == 0.5:
        assert len(got["prompt_token_ids"]) > 32  # the engine prefilled it in chunks of 32


def test_mixed_batch_matches_requests_run_alone(env):
    """Methods and ratios mixed in one generate() batch give each request's solo output."""
    specs = [
        spec(policy={"method": "fastervlm", "ratio": 0.5}),
        spec(images=TWO, policy={"method": "random", "ratio": 0.9, "seed": 3}),
        spec(policy="absent"),
        spec(images=(IMG_B,), policy={"method": "pool", "ratio": 0.75}),
        spec(images=TWO, policy={"method": "aim", "ratio": 0.5, "instruction": "what is this ?"}),
        spec(images=(IMG_B, IMG_A), policy={"method": "fastervlm", "ratio": 0.9}),
    ]
    batch = env.engine.run(specs)
    for s, got in zip(specs, batch):
        assert_same_output(got, env.engine.run_one(s), atol=1e-4, what=str(s.get("vlmprune")))


def test_same_image_at_several_ratios_and_repeated_requests_are_consistent(env):
    """One image at ratios 0 / 0.5 / 0.9 in one batch, then the same batch again (processor, encoder
    and prefix cache hits): counts follow the ratio and the repeat reproduces the first run."""
    specs = [spec(policy={"method": "fastervlm", "ratio": r}) for r in (0.0, 0.5, 0.9)]
    first = env.engine.run(specs)
    again = env.engine.run(specs)
    counts = [o["prompt_token_ids"].count(image_token_id(env)) for o in first]
    assert counts == [36, 18, 4]
    for a, b in zip(first, again):
        assert_same_output(b, a, atol=1e-5, what="repeat")
    swapped = env.engine.run(specs[::-1])[::-1]  # cached items in another batch order
    for a, b in zip(first, swapped):
        assert_same_output(b, a, atol=1e-4, what="reordered")


BAD = [
    ({"method": "fastervlm", "ratio": 1.5}, r"field 'ratio'.*1\.5"),
    ({"method": "fastervlm", "ratio": "abc"}, r"field 'ratio'.*must be a number.*'abc'"),
    ({"method": "fastest", "ratio": 0.5}, r"unknown method 'fastest'.*known methods"),
    ({"method": "fastervlm", "ratio": 0.5, "speed": 2}, r"unknown option 'speed' for method 'fastervlm'"),
    ({"method": "globalcom2", "ratio": 0.5}, r"method 'globalcom2' does not apply to model family 'llava'"),
    ({"method": "transprune", "ratio": 0.5}, r"method 'transprune' needs the instruction probe"),
    ("fastervlm", r"must be a mapping"),
]


@pytest.mark.parametrize("policy,message", BAD, ids=[m.split("'")[1] if "'" in m else m for _, m in BAD])
def test_bad_policy_fails_that_request_and_the_engine_keeps_serving(env, policy, message):
    """A bad policy raises a ValueError naming the problem for its request; the engine serves on."""
    good = spec(policy={"method": "fastervlm", "ratio": 0.5})
    before = env.engine.run_one(good)
    with pytest.raises(ValueError, match=message):
        env.engine.run([good, spec(policy=policy)])
    assert_same_output(env.engine.run_one(good), before, atol=1e-5, what="after the error")


def test_latency_ratio0_vs_0_9(env, timings):
    """Per-request latency of one image at ratio 0 and 0.9 (measured, see the timings line).

    The tiny model is overhead-dominated, so pruning cannot be expected to be faster here; the
    check bounds the plugin's own per-request overhead (hooks, scoring, selection)."""
    env.engine.run_one(spec())  # warm-up
    t0, t9 = median_latency(env.engine, (96, 64), 0.0, 0), median_latency(env.engine, (96, 64), 0.9, 10)
    timings["latency_ratio0_s"], timings["latency_ratio0.9_s"] = t0, t9
    assert t9 < t0 + 0.25
