"""In-LLM TransPrune, AIM, FastV and explain inside the served Qwen2-VL / Qwen2.5-VL LM (the default route).

One real vLLM CPU engine per family (module-scoped, one after the other; tiny models: 4 decoder
layers, M-RoPE), run as the in-LLM mode requires (eager, no chunked prefill), prefix caching on.
What differs from LLaVA (test_plugin_inllm.py) and is checked here: the runner's (3, T) M-RoPE
positions are sliced and gathered per row group (kept rows keep their (t, h, w) ids, TransPrune's
``positions="reindex"`` included, as the reference's Qwen adapters), decoded tokens continue at the
prompt's largest id + 1 (vLLM's ``mrope_position_delta``, the reference's ``next_positions``), the
instruction starts after ``<|vision_end|>``, and the two images have different token counts (24 and
12), so each image's stage counts come from its own grid (AIM's placeholders are already merged).
Exactness: the kept rows of every stage, the greedy tokens (8 steps) and their logprobs equal the
transformers reference backend on the same weights and prompt; ratio 0 and no policy equal the stock
engine (plugin excluded, run first in a subprocess, so only one engine runs at a time).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from engine_helpers import (
    CHUNKED_POLICIES,
    IN_LLM_ENGINE,
    IN_LLM_ENV_VARS,
    Engine,
    StockRun,
    assert_chunked_preamble_equals_reference,
    assert_logprobs,
    assert_same_output,
    build_model,
    chat_spec,
    inllm_reference,
    inllm_run,
    saved_env,
    ship_explain_cnn,
    vllm_kept,
)

from vlmprune.vllm_plugin import inllm_plan

pytestmark = pytest.mark.slow

QUESTION = "what colour is the box ?"
IMAGES = ((112, 168, 1), (84, 112, 2))  # 6x4 = 24 and 4x3 = 12 merged tokens
SIZES = (24, 12)
CASES = [(m, r) for m in ("transprune", "aim", "explain") for r in (0.5, 0.9)] + [("fastv", 0.5), ("fastv", 0.7)]
LOGPROB_ATOL = 1e-3
"""vLLM and transformers in float32; the Qwen ViT (and AIM's merge metric, the merger output) is
loaded whole in vLLM, so every method is held to the same bound."""


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def env(request, tmp_path_factory, timings):
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    family = request.param
    root = tmp_path_factory.mktemp(f"inllm_{family}")
    model_dir, model, processor = build_model(family, root)
    ship_explain_cnn(model_dir, model)
    stock_specs = [chat_spec(processor, QUESTION, IMAGES), chat_spec(processor, QUESTION)]
    stock = StockRun(model_dir, stock_specs, root).result(timeout=900)  # first: one engine at a time
    with saved_env(IN_LLM_ENV_VARS):
        engine = Engine(model_dir, **IN_LLM_ENGINE)
        assert engine.llm.apply_model(lambda _m: inllm_plan.start_log()) == [True]
        timings[f"inllm_{family}_engine_start_s"] = engine.start_s
        yield SimpleNamespace(family=family, engine=engine, ref=ReferenceBackend(model, processor),
                              processor=processor, stock=stock["outputs"][0], stock_text=stock["outputs"][1])
        engine.shutdown()


def test_kept_rows_and_greedy_tokens_equal_the_reference(env):
    """Every method and ratio in one batch with an unpruned request and a text-only one; each
    in-LLM request equals the reference run alone, the unpruned one equals stock."""
    policies = [{"method": m, "ratio": r} for m, r in CASES]
    policies.append({"method": "transprune", "ratio": 0.75, "positions": "original"})
    specs = [chat_spec(env.processor, QUESTION, IMAGES, p) for p in policies]
    others = [chat_spec(env.processor, QUESTION, IMAGES), chat_spec(env.processor, QUESTION)]
    outs, records = inllm_run(env.engine, specs + others)
    assert records[len(specs):] == [None, None]
    for got, want, what in ((outs[-2], env.stock, "unpruned"), (outs[-1], env.stock_text, "text-only")):
        got = dict(got, token_ids=got["token_ids"][:4], logprobs=got["logprobs"][:4])
        assert_same_output(got, want, what=f"{env.family} {what} request in the batch")
    for policy, spec, out, record in zip(policies, specs, outs, records):
        what = f"{env.family} {policy}"
        want_tokens, want_stages, want_lps = inllm_reference(env.ref, spec, policy)
        assert record is not None, f"{what}: the request ran no in-LLM stage"
        if policy["method"] != "aim":  # every visual token enters the LLM (AIM's are merged first)
            assert [len(s) for s in record["spans"]] == list(SIZES), what
        assert vllm_kept(record) == want_stages, f"{what}: kept rows per stage differ (stages {record['stages']})"
        assert any(len(k) < n for st in want_stages for k, n in zip(st, SIZES)), f"{what}: nothing was pruned"
        assert out["token_ids"] == want_tokens, f"{what}: greedy tokens differ"
        assert_logprobs(out, want_tokens, want_lps, what, LOGPROB_ATOL)


def test_reindex_keeps_the_mrope_ids_as_the_reference(env):
    """On M-RoPE TransPrune's ``positions`` option changes nothing (both keep the original ids)."""
    specs = [chat_spec(env.processor, QUESTION, IMAGES, {"method": "transprune", "ratio": 0.75, "positions": p})
             for p in ("reindex", "original")]
    outs, records = inllm_run(env.engine, specs)
    assert records[0]["decisions"] == records[1]["decisions"]
    assert_same_output(outs[0], outs[1], atol=1e-5, what=f"{env.family} reindex vs original")


def test_ratio_zero_and_no_policy_equal_stock(env):
    specs = [chat_spec(env.processor, QUESTION, IMAGES, p) for p in
             ("absent", {"method": "transprune", "ratio": 0.0}, {"method": "aim", "ratio": 0.0},
              {"method": "fastv", "ratio": 0.0})]
    outs, records = inllm_run(env.engine, specs)
    assert records == [None] * len(specs)
    for i, got in enumerate(outs):
        got = dict(got, token_ids=got["token_ids"][:4], logprobs=got["logprobs"][:4])
        assert_same_output(got, env.stock, what=f"{env.family} request {i}")


def test_text_before_the_images_is_chunked_and_the_span_prefilled_whole(env):
    """vLLM's defaults (chunked prefill on, 512-token steps): an earlier text turn makes the prompt
    longer than a step; it is prefilled in chunks up to the first image (M-RoPE ids of the text as
    vLLM computes them), then the span whole; every method equals the reference."""
    assert_chunked_preamble_equals_reference(
        env.engine, env.ref, lambda p, pre: chat_spec(env.processor, QUESTION, IMAGES, p, pre), CHUNKED_POLICIES,
        LOGPROB_ATOL)
