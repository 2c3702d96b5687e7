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
from vlmprune.vllm_plugin.encoder_budget import encoder_calls
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
        engine = Engine(model_dir, max_num_batched_tokens=BUDGET, max_num_seqs=REQUESTS, limit_mm_per_prompt={"image": 1})
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
