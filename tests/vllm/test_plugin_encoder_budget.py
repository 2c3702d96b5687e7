"""Encoder work as vLLM profiled it: a pruned image costs the encoder budget its unpruned size.

vLLM admits images into a step while their placeholder counts fit the encoder compute budget; the
plugin's pruned images have fewer placeholders but run the whole vision tower, so without
:mod:`vlmprune.vllm_plugin.encoder_budget` a step at ratio 0.9 would encode about ten times the
images vLLM profiled its memory for. 32 concurrent one-image requests (distinct images: no encoder
cache hits) on one real engine, at ratio 0 and at 0.9: the most images one encoder call runs is the
same, and within the budget (``max_num_batched_tokens`` here, above one image's 36 tokens).
"""

from __future__ import annotations

import pytest

from engine_helpers import IN_LLM_ENV_VARS, Engine, build_model, chat_spec, saved_env
from vlmprune.vllm_plugin.fields import encoder_calls
from vllm_stock_runner import vllm_request

pytestmark = pytest.mark.slow

BUDGET = 128
"""``max_num_batched_tokens``: vLLM's encoder compute budget is max(this, the largest image), so a
step encodes 3 stock LLaVA images (36 tokens each); at ratio 0.9 (4 tokens each) it would take 32."""
REQUESTS = 32
IMAGE_TOKENS = 36


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoder_budget")
    model_dir, _model, processor = build_model("llava", root)
    with saved_env(IN_LLM_ENV_VARS):
        engine = Engine(model_dir, max_num_batched_tokens=BUDGET, max_num_seqs=REQUESTS, limit_mm_per_prompt={"image": 2})
        try:
            yield engine, processor
        finally:
            engine.shutdown()


def images_per_call(engine, processor, ratio: float, seed: int) -> list[int]:
    from vllm import SamplingParams

    specs = [chat_spec(processor, "what is this ?", [(96, 64, seed + i)], policy={"method": "pool", "ratio": ratio})
             for i in range(REQUESTS)]
    engine.llm.apply_model(encoder_calls)  # clear
    outs = engine.llm.generate([vllm_request(s) for s in specs], SamplingParams(max_tokens=2, temperature=0.0),
                               use_tqdm=False)
    assert len(outs) == REQUESTS and all(len(o.outputs[0].token_ids) == 2 for o in outs)
    (calls,) = engine.llm.apply_model(encoder_calls)
    assert sum(calls) == REQUESTS, calls
    return calls


def test_a_pruned_image_costs_the_encoder_budget_its_unpruned_size(env):
    engine, processor = env
    stock = images_per_call(engine, processor, 0.0, seed=100)
    pruned = images_per_call(engine, processor, 0.9, seed=200)
    print(f"\n[encoder budget] images per encoder call, ratio 0: {stock}; ratio 0.9: {pruned}")
    assert max(stock) == BUDGET // IMAGE_TOKENS
    assert max(pruned) == max(stock), f"ratio 0.9 encodes {max(pruned)} images in one call, ratio 0 {max(stock)}"


def test_an_in_llm_request_encodes_all_its_images_in_one_step_under_encoder_pressure(env):
    """Two-image in-LLM requests among one-image requests that spend the step's encoder budget: vLLM
    would cut a step between an in-LLM request's two images (it stops before an image it cannot
    encode), inside the span its stages need whole; the plugin holds both images for one later
    step, and every in-LLM request gets its solo answer."""
    from vllm import SamplingParams

    engine, processor = env
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3)
    in_llm = [chat_spec(processor, "what colour is the box ?", [(96, 64, 300 + 2 * i), (64, 96, 301 + 2 * i)],
                        policy={"method": "transprune", "ratio": 0.75}) for i in range(4)]
    others = [chat_spec(processor, "what is this ?", [(96, 64, 400 + i)], policy={"method": "pool", "ratio": 0.9})
              for i in range(12)]
    batch = [s for pair in zip(others[::3], others[1::3], others[2::3], in_llm) for s in pair]
    outs = engine.llm.generate([vllm_request(s) for s in batch], params, use_tqdm=False)
    got = {id(s): o.outputs[0] for s, o in zip(batch, outs)}
    for s in in_llm:  # alone, afterwards (its images then come from the encoder cache)
        (solo,) = engine.llm.generate([vllm_request(s)], params, use_tqdm=False)
        assert list(got[id(s)].token_ids) == list(solo.outputs[0].token_ids), s["images"]
        for mine, want in zip(got[id(s)].logprobs, solo.outputs[0].logprobs):
            assert mine.keys() == want.keys()
            assert all(abs(mine[t].logprob - want[t].logprob) < 1e-4 for t in mine)
