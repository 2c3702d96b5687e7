"""In-LLM TransPrune, AIM, FastV and explain inside the served LLaVA-NeXT LM (the default route).

The LLaVA-1.5 module's checks (``test_plugin_inllm.py``, whose helpers this one shares) on the tiny
AnyRes model: one real vLLM CPU engine, run as the in-LLM mode requires. An image here is a base
view plus a crop grid with one newline row per grid row, so its prunable count depends on its size:
two images of different sizes and crop grids in one request. Exactness: per stage, each image's kept
placeholder rows (newlines included: the reference never prunes them) and 8 greedy tokens equal the
transformers reference backend's progressive loop; ratio 0 and no policy equal the stock engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from engine_helpers import (
    CHUNKED_POLICIES,
    IN_LLM_ENGINE,
    IN_LLM_ENV_VARS,
    Engine,
    StockRun,
    assert_batch_gives_solo_answers,
    assert_chunked_preamble_equals_reference,
    assert_logprobs,
    assert_same_output,
    build_model,
    saved_env,
    ship_explain_cnn,
    vllm_kept,
)
from test_plugin_inllm import LOGPROB_ATOL, QUESTION, make_spec, reference, run

from vlmprune.policy import parse_policy
from vlmprune.reduction.plan import plan_image
from vlmprune.vllm_plugin import inllm_plan

pytestmark = pytest.mark.slow

LAYERS = 4  # the tiny model's decoder depth
IMAGES = ((96, 64, 1), (90, 90, 3))
"""Landscape (2 crops wide) and square (2x2 crops): different prunable and newline counts."""


@pytest.fixture(scope="module")
def env(tmp_path_factory, timings):
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    root = tmp_path_factory.mktemp("inllm_llava_next")
    # vision_feature_layer=-2, as LLaVA: vLLM's tower stops one layer short and AIM's merge keys come
    # from the plugin's FinalLayerQK, so the merged rows (newline rows included) equal the reference's.
    model_dir, model, processor = build_model("llava_next", root)
    ship_explain_cnn(model_dir, model)
    stock_specs = [make_spec(processor, images=IMAGES)]
    stock = StockRun(model_dir, stock_specs, root).result(timeout=900)  # first: one engine at a time
    with saved_env(IN_LLM_ENV_VARS):
        engine = Engine(model_dir, **IN_LLM_ENGINE)
        assert engine.llm.apply_model(lambda _m: inllm_plan.start_log()) == [True]
        timings["inllm_next_engine_start_s"] = engine.start_s
        ref = ReferenceBackend(model, processor)
        yield SimpleNamespace(engine=engine, ref=ref, processor=processor, stock=stock["outputs"][0])
        engine.shutdown()


CASES = [(m, r) for m in ("transprune", "aim", "explain") for r in (0.5, 0.9)] + [("fastv", 0.5), ("fastv", 0.7)]
"""FastV at 0.9 on a 4-layer model keeps no visual token after its layer (its one stage solved
for the ratio), so 0.7 is its high ratio here."""


def test_kept_rows_and_greedy_tokens_equal_the_reference(env):
    """Every case in one ``generate`` batch (one engine pass), each against its reference."""
    specs = [make_spec(env.processor, images=IMAGES, policy={"method": m, "ratio": r}) for m, r in CASES]
    outs, records = run(env, specs)
    (pre,) = env.ref.prefill([_hf(specs[0])], None)
    n_prunable = [im.n_prunable for im in pre.images]
    newlines = [im.n_tokens - im.n_prunable for im in pre.images]
    assert len(set(n_prunable)) == 2 and all(newlines), f"the images must differ in size: {n_prunable}, {newlines}"
    for (method, ratio), spec, out, record in zip(CASES, specs, outs, records):
        what = f"{method}@{ratio}"
        policy = {"method": method, "ratio": ratio}
        want_tokens, want_stages, want_lps = reference(env, spec, policy)
        assert record is not None, f"{what}: the request ran no in-LLM stage"
        want_input = [plan_image(parse_policy(policy), "llava_next", n, LAYERS, route="in_llm").entering for n in n_prunable]
        assert [len(s) for s in record["spans"]] == want_input, f"{what}: prunable rows per image at the input"
        assert [length - len(s) for (_, length), s in zip(record["runs"], record["spans"])] == newlines, (
            f"{what}: every newline row is outside the prunable spans"
        )
        got_stages = vllm_kept(record)
        assert got_stages == want_stages, f"{what}: kept rows per stage differ (stages {record['stages']})"
        assert any(len(k) - nl < n for st in want_stages for k, n, nl in zip(st, n_prunable, newlines)), (
            f"{what}: nothing was pruned"
        )
        assert out["token_ids"] == want_tokens, f"{what}: greedy tokens differ"
        assert_logprobs(out, want_tokens, want_lps, what, LOGPROB_ATOL[method])


def test_ratio_zero_and_no_policy_equal_stock(env):
    specs = [
        make_spec(env.processor, images=IMAGES, policy={"method": "transprune", "ratio": 0.0}),
        make_spec(env.processor, images=IMAGES, policy={"method": "fastv", "ratio": 0.0}),
        make_spec(env.processor, images=IMAGES),
    ]
    outs, records = run(env, specs)
    assert records == [None] * 3
    for i, got in enumerate(outs):
        got = dict(got, token_ids=got["token_ids"][:4], logprobs=got["logprobs"][:4])
        assert_same_output(got, env.stock, what=f"request {i}")


def test_mixed_batch_gives_each_request_its_solo_answer(env):
    specs = [
        make_spec(env.processor, images=IMAGES[1:], policy={"method": "transprune", "ratio": 0.75}),
        make_spec(env.processor, "how many circle are on the left ?", images=IMAGES, policy={"method": "aim", "ratio": 0.9}),
        make_spec(env.processor, images=IMAGES[:1], policy={"method": "fastervlm", "ratio": 0.5}),
        make_spec(env.processor, images=()),
        make_spec(env.processor, QUESTION, images=IMAGES[::-1], policy={"method": "fastv", "ratio": 0.5}),
    ]
    assert_batch_gives_solo_answers(env.engine, specs)


def _hf(spec):
    from engine_helpers import hf_request

    return hf_request(spec)


def test_layout_rejects_a_run_without_its_newline_rows(env):
    """AIM's merged run: the newline rows are found in the image's encoder output; a run whose
    rows do not hold the geometry's newline count is refused, not silently mis-split."""
    def probe(model):
        from vllm.multimodal.inputs import PlaceholderRange

        size = torch.tensor([64, 96])
        feature = SimpleNamespace(data={"image_sizes": SimpleNamespace(data=size)}, identifier="x",
                                  mm_position=PlaceholderRange(offset=0, length=20))
        runner = SimpleNamespace(encoder_cache={"x": torch.zeros(20, model.image_newline.numel())})
        try:
            model._vlmprune_image_layout(feature, runner)
        except RuntimeError as exc:
            return str(exc)
        return None

    (message,) = env.engine.llm.apply_model(probe)
    assert message is not None and "newline rows" in message


def test_text_before_the_image_is_chunked_and_the_span_prefilled_whole(env):
    """vLLM's defaults (chunked prefill on, 512-token steps): an earlier text turn makes the prompt
    longer than a step; it is prefilled in chunks up to the image, then the span (crops, newline
    rows) whole; every method equals the reference. The image is one no other test sends, so it is
    not in the encoder cache when the chunks before it run (AIM's merged run is read from the encoder
    output, which only the span's step has)."""
    assert_chunked_preamble_equals_reference(
        env.engine, env.ref, lambda p, pre: make_spec(env.processor, images=((80, 112, 7),), policy=p, preamble=pre),
        CHUNKED_POLICIES, max(LOGPROB_ATOL.values()))
