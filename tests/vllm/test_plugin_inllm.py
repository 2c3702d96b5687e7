"""In-LLM TransPrune, AIM and FastV inside the served LLaVA-1.5 LM (the default route, vllm_plugin/inllm.py).

One real vLLM CPU engine (tiny LLaVA-1.5: 4 decoder layers, 36 visual tokens per image), engine core
in this process, with vLLM's defaults as the launcher leaves them (chunked prefill and prefix caching on).
Exactness: the kept rows of every stage and the greedy tokens (8 steps) equal the transformers
reference backend's progressive loop on the same weights and prompt; ratio 0, no policy and text-only
requests are token-for-token the stock engine (plugin excluded, run first in a subprocess, so only one
engine runs at a time); a mixed batch gives every request its solo answer; two requests with the same
image and different questions, together and one after the other, get their solo answers, and in-LLM
requests never read a prefix-cache hit while stock ones do.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import (
    CHUNKED_POLICIES,
    IN_LLM_ENGINE,
    IN_LLM_ENV_VARS,
    IN_LLM_STEPS,
    Engine,
    PREAMBLE,
    StockRun,
    assert_batch_gives_solo_answers,
    assert_chunked_preamble_equals_reference,
    assert_logprobs,
    assert_same_output,
    build_model,
    chat_spec,
    ship_explain_cnn,
    inllm_reference,
    inllm_run,
    inllm_sampling,
    saved_env,
    vllm_kept,
    vllm_request,
)

from vlmprune.vllm_plugin import engine_checks, inllm_plan, inllm_scoring

pytestmark = pytest.mark.slow

STEPS = IN_LLM_STEPS
QUESTION = "what colour is the box ?"
OTHER = "how many circle are on the left ?"
IMAGES = ((96, 64, 1), (64, 96, 2))


def make_spec(processor, prompt=QUESTION, images=IMAGES[:1], policy="absent", preamble=None) -> dict:
    return chat_spec(processor, prompt, images, policy, preamble)


LONG_TEXT = " ".join([OTHER] * 70)
"""A text-only prompt of ~560 tokens: prefilled in chunks, as stock does."""


@pytest.fixture(scope="module")
def env(tmp_path_factory, timings):
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    root = tmp_path_factory.mktemp("inllm_llava")
    model_dir, model, processor = build_model("llava", root)
    ship_explain_cnn(model_dir, model)
    stock_specs = [make_spec(processor), make_spec(processor, images=()), make_spec(processor, images=IMAGES),
                   make_spec(processor, LONG_TEXT, images=())]
    stock = StockRun(model_dir, stock_specs, root, max_model_len=IN_LLM_ENGINE["max_model_len"]).result(timeout=900)
    with saved_env(IN_LLM_ENV_VARS):
        engine = Engine(model_dir, **IN_LLM_ENGINE)
        assert engine.llm.apply_model(lambda _m: inllm_plan.start_log()) == [True]
        timings["inllm_engine_start_s"] = engine.start_s
        yield SimpleNamespace(engine=engine, ref=ReferenceBackend(model, processor), processor=processor,
                              stock=dict(zip(("one", "text", "two", "long_text"), stock["outputs"])), stock_specs=stock_specs)
        engine.shutdown()


def run(env, specs):
    """(outputs, in-LLM log records in request order) of one ``generate`` call."""
    return inllm_run(env.engine, specs)


def reference(env, spec, policy):
    return inllm_reference(env.ref, spec, policy)


LOGPROB_ATOL = {"transprune": 1e-3, "fastv": 1e-3, "aim": 1e-3, "explain": 1e-3}
"""vLLM and transformers in float32 (the spike measured 5.5e-6 on a text-only model). AIM's ToMe merge
before the LLM reads the last ViT layer's keys in both (vLLM: ``FinalLayerQK``, the layer vLLM's
tower does not build); with the last *loaded* layer's keys instead, |dlogprob| was 8e-3 / 2e-3 at
ratio 0.5 / 0.9."""




CASES = [(m, r) for m in ("transprune", "aim", "explain") for r in (0.5, 0.9)] + [("fastv", 0.5), ("fastv", 0.7)]
"""explain: its one choice at layer 0 (the CNN over layer 0's instruction attention on the whole
prompt) equals the reference's LLM-input reduction."""


@pytest.mark.parametrize("method,ratio", CASES)
def test_kept_rows_and_greedy_tokens_equal_the_reference(env, method, ratio):
    policy = {"method": method, "ratio": ratio}
    spec = make_spec(env.processor, images=IMAGES, policy=policy)
    (out,), (record,) = run(env, [spec])
    want_tokens, want_stages, want_lps = reference(env, spec, policy)
    assert record is not None, "the request ran no in-LLM stage"
    got_stages = vllm_kept(record)
    assert got_stages == want_stages, f"{method}@{ratio}: kept rows per stage differ (stages {record['stages']})"
    assert len(want_stages) >= 1 and any(len(k) < 36 for st in want_stages for k in st), "nothing was pruned"
    assert out["token_ids"] == want_tokens, f"{method}@{ratio}: greedy tokens differ"
    assert_logprobs(out, want_tokens, want_lps, f"{method}@{ratio}", LOGPROB_ATOL[method])


@pytest.mark.parametrize("policy", [
    {"method": "transprune", "ratio": 0.75, "positions": "original"},
    {"method": "fastv", "ratio": 0.6, "query": "instruction"},
])
def test_options_match_the_reference(env, policy):
    spec = make_spec(env.processor, policy=policy)
    (out,), (record,) = run(env, [spec])
    want_tokens, want_stages, want_lps = reference(env, spec, policy)
    assert vllm_kept(record) == want_stages
    assert out["token_ids"] == want_tokens
    assert_logprobs(out, want_tokens, want_lps, str(policy), LOGPROB_ATOL[policy["method"]])


def test_ratio_zero_no_policy_and_text_only_equal_stock(env):
    specs = [
        make_spec(env.processor, policy={"method": "transprune", "ratio": 0.0}),
        make_spec(env.processor),
        make_spec(env.processor, images=()),
        make_spec(env.processor, images=IMAGES, policy={"method": "aim", "ratio": 0.0}),
    ]
    outs, records = run(env, specs)
    assert records == [None] * 4
    want = [env.stock["one"], env.stock["one"], env.stock["text"], env.stock["two"]]
    for i, (got, w) in enumerate(zip(outs, want)):
        got = dict(got, token_ids=got["token_ids"][:4], logprobs=got["logprobs"][:4])
        assert_same_output(got, w, what=f"request {i}")


def test_mixed_batch_gives_each_request_its_solo_answer(env):
    specs = [
        make_spec(env.processor, policy={"method": "transprune", "ratio": 0.75}),
        make_spec(env.processor, OTHER, images=IMAGES, policy={"method": "aim", "ratio": 0.9}),
        make_spec(env.processor, images=IMAGES[1:], policy={"method": "fastervlm", "ratio": 0.5}),
        make_spec(env.processor),
        make_spec(env.processor, images=()),
        make_spec(env.processor, OTHER, images=IMAGES, policy={"method": "transprune", "ratio": 0.9}),
        make_spec(env.processor, OTHER, policy={"method": "fastv", "ratio": 0.5}),
    ]
    assert_batch_gives_solo_answers(env.engine, specs)


def cached_tokens(env, specs) -> list[int]:
    """vLLM's prefix-cache hits (tokens) of each request of one ``generate`` call."""
    outs = env.engine.llm.generate([vllm_request(s) for s in specs], inllm_sampling(), use_tqdm=False)
    return [int(o.num_cached_tokens or 0) for o in outs]


def test_same_image_different_questions_together_and_in_turn(env):
    """With prefix caching on: every in-LLM run equals its solo answer and the reference, and reads
    no cache hit (a repeat of the same prompt would hit every full block, and the stage would then
    miss rows); stock and pre-LLM requests sharing the image still read theirs."""
    assert env.engine.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    policy = {"method": "transprune", "ratio": 0.9}
    a = make_spec(env.processor, QUESTION, policy=policy)
    b = make_spec(env.processor, OTHER, policy=policy)
    (sa,), (ra,) = run(env, [a])
    (sb,), (rb,) = run(env, [b])
    together, recs = run(env, [a, b])
    assert_same_output(together[0], sa, what="first, together")
    assert_same_output(together[1], sb, what="second, together")
    assert recs[0]["decisions"] == ra["decisions"] and recs[1]["decisions"] == rb["decisions"]
    (again,), _ = run(env, [a])
    assert_same_output(again, sa, what="first, again after the second")
    for spec, rec in ((a, ra), (b, rb)):
        assert vllm_kept(rec) == reference(env, spec, policy)[1]
    fastv = make_spec(env.processor, QUESTION, policy={"method": "fastv", "ratio": 0.5})
    assert cached_tokens(env, [a, b, fastv]) == [0, 0, 0]
    assert cached_tokens(env, [fastv]) == [0], "an in-LLM request read a prefix-cache hit"
    for other in (make_spec(env.processor), make_spec(env.processor, images=IMAGES, policy={"method": "fastervlm", "ratio": 0.5})):
        cached_tokens(env, [other])  # both prompts are longer than one 32-token block
        (hits,) = cached_tokens(env, [other])
        assert hits >= 32, f"a repeated {other.get('vlmprune', 'stock')} request read no prefix-cache hit"


def test_long_prompts_over_the_token_budget_are_each_prefilled_whole(env):
    """The engine's real scheduler (chunked prefill on, 512 tokens per step): three in-LLM prompts
    of ~200-300 tokens do not fit one step together; each is scheduled whole in a later step (a
    split span would stop the stage: ``InLLMForward._starts_span``), and each equals its solo answer."""
    budget = env.engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    long_question = " ".join([QUESTION] * 30)
    specs = [
        make_spec(env.processor, long_question, images=IMAGES, policy={"method": "transprune", "ratio": 0.75}),
        make_spec(env.processor, " ".join([OTHER] * 25), policy={"method": "fastv", "ratio": 0.5}),
        make_spec(env.processor, long_question, policy={"method": "aim", "ratio": 0.9}),
    ]
    outs, _ = run(env, specs)
    lengths = [len(o["prompt_token_ids"]) for o in outs]
    assert sum(lengths) > budget and max(lengths) < budget, (lengths, budget)
    assert_batch_gives_solo_answers(env.engine, specs)


def test_text_before_the_image_is_chunked_and_the_span_prefilled_whole(env):
    """vLLM's defaults (chunked prefill on, a 512-token step): a prompt whose text before the image
    makes it longer than a step is prefilled in chunks up to its image, then from the image to its
    end in one step, whose stages read the cached text's keys from the KV cache; kept rows per
    stage, greedy tokens and logprobs equal the reference. A long text-only request chunked in the
    same batch equals stock, and each request of that batch equals its solo answer.

    Measured (2026-12-07): transprune at 0.75 on this prompt swaps one row at its second stage; its
    top-12 boundary there is a near-tie (scores 0.106067 vs 0.106061), and TTV (1 - cos of a
    sub-block's input and output) turns the CPU attention kernel's chunk-dependent rounding into
    score differences of ~1e-5. At 0.9 (three stages) every stage is separated and equal."""
    budget = env.engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    policies = (*CHUNKED_POLICIES, {"method": "fastv", "ratio": 0.6, "query": "instruction"})
    specs = assert_chunked_preamble_equals_reference(
        env.engine, env.ref, lambda p, pre: make_spec(env.processor, images=IMAGES, policy=p, preamble=pre), policies,
        1e-3)
    long_text = make_spec(env.processor, LONG_TEXT, images=())
    (out,), _ = run(env, [long_text])
    assert len(out["prompt_token_ids"]) > budget
    assert_same_output(dict(out, token_ids=out["token_ids"][:4], logprobs=out["logprobs"][:4]), env.stock["long_text"],
                       what="long text-only request")
    assert_batch_gives_solo_answers(env.engine, [long_text, *specs[:2], make_spec(env.processor)])


def test_negative_control_without_the_cached_keys_the_stages_choose_otherwise(env, monkeypatch):
    """The stages of a chunked prompt need the earlier chunks' keys: read from the wrong half of the
    CPU cache's blocks (the values, a layout mistake), the kept rows change, so the test above can fail."""
    def values_instead(layer, table, n):
        cache = layer.self_attn.attn.kv_cache
        blocks, heads, size, width = cache.shape
        j = torch.arange(n)
        return cache.view(blocks, heads, 2 * size, width // 2)[table[j // size].long(), :, size + j % size, :]

    monkeypatch.setattr(inllm_scoring, "cached_keys", values_instead)
    changed = []
    for policy in ({"method": "transprune", "ratio": 0.9}, {"method": "fastv", "ratio": 0.5}, {"method": "aim", "ratio": 0.9}):
        spec = make_spec(env.processor, images=IMAGES, policy=policy, preamble=PREAMBLE)
        (_,), (record,) = run(env, [spec])
        changed.append(vllm_kept(record) != reference(env, spec, policy)[1])
    assert any(changed), changed


def test_stage_scoring_projects_the_keys_alone_and_equals_the_full_projection(env):
    """A stage needs the keys of every row and the queries of a few: the plugin keeps each layer's
    key projection at load (vLLM then packs the fused q/k/v weights) and projects only those; its q
    and k equal the full q/k/v projection's (RoPE applied) on the same rows."""
    def check(model):
        layer = model.language_model.model.layers[1]
        torch.manual_seed(0)
        h = torch.randn(40, layer.self_attn.qkv_proj.input_size)
        pos, rows = torch.arange(40), torch.tensor([7, 39])
        row = SimpleNamespace(prefix=0)
        q, k = inllm_scoring.stage_qk(layer, h, pos, row, rows)
        q_all, k_all = inllm_scoring.stage_qk(layer, h, pos, row)
        return (hasattr(layer.self_attn, "vlmprune_key_proj"), float((q - q_all[rows]).abs().max()),
                float((k - k_all).abs().max()), float(k_all.abs().max()))

    ((kept, dq, dk, scale),) = env.engine.llm.apply_model(check)
    assert kept, "the key projection was not kept at load"
    assert dq <= 1e-5 * scale and dk <= 1e-5 * scale, (dq, dk, scale)


def test_span_longer_than_the_step_is_refused_and_the_engine_serves_on(env):
    """An in-LLM request whose rows from the image to the end exceed the step budget cannot be
    prefilled whole: the processor refuses it (the 400 of vLLM's server), naming the limit; the next
    requests (the same prompt pre-LLM, and an in-LLM one) are served."""
    long_question = " ".join([QUESTION] * 80)
    with pytest.raises(Exception, match=r"needs \d+ tokens there.*--max-num-batched-tokens 512"):
        run(env, [make_spec(env.processor, long_question, images=IMAGES, policy={"method": "fastv", "ratio": 0.5})])
    (out,), (record,) = run(env, [make_spec(env.processor, long_question, images=IMAGES,
                                            policy={"method": "fastervlm", "ratio": 0.5})])
    assert record is None and len(out["prompt_token_ids"]) > 512
    (out,), (record,) = run(env, [make_spec(env.processor, images=IMAGES, policy={"method": "fastv", "ratio": 0.5})])
    assert record is not None and out["token_ids"]


def test_traces_record_every_stage_of_the_in_llm_selection(env, tmp_path, monkeypatch):
    """A traced in-LLM request (the playground's overlays): each image's record holds its LLM-input
    tokens and the tokens kept after every stage, equal to the stage log (itself equal to the
    reference, above); ``kept`` is the last stage's; the playground's stage list sums them."""
    from server.playground.serving import in_llm_stages
    from vlmprune.trace import TRACE_DIR_ENV, pop_trace

    monkeypatch.setenv(TRACE_DIR_ENV, str(tmp_path))  # the processor and the worker run in this process
    for policy in ({"method": "transprune", "ratio": 0.75}, {"method": "fastv", "ratio": 0.5}, {"method": "aim", "ratio": 0.9}):
        trace_id = f"inllm-{policy['method']}"
        (_,), (record,) = run(env, [make_spec(env.processor, images=IMAGES, policy={**policy, "trace": trace_id})])
        traces = pop_trace(tmp_path, trace_id, len(IMAGES))
        assert traces is not None, "no trace written"
        per_stage = vllm_kept(record)  # per stage, per image: positions among the image's LLM-input rows
        for j, trace in enumerate(traces):
            if policy["method"] != "aim":  # every token enters the LLM (aim: its merged tokens)
                assert trace["input_kept"] == list(range(36))
            assert [st["after_layer"] for st in trace["stages"]] == record["stages"]
            for s, stage in enumerate(trace["stages"]):
                assert stage["kept"] == [trace["input_kept"][p] for p in per_stage[s][j]], (policy, j, s)
            assert trace["kept"] == trace["stages"][-1]["kept"] and len(trace["kept"]) < len(trace["input_kept"])
        stages = in_llm_stages(traces, 72)
        assert [st.where for st in stages] == ["LLM input"] + [f"after layer {k}" for k in record["stages"]]
        assert [st.kept for st in stages[1:]] == [sum(len(k) for k in kept) for kept in per_stage]


def test_unsafe_engine_settings_are_refused_naming_the_flag(env):
    config = env.engine.llm.llm_engine.vllm_config
    engine_checks.check_engine_in_llm(config, "m")  # the engine's own settings are safe
    assert config.scheduler_config.enable_chunked_prefill and config.cache_config.enable_prefix_caching
    for attr, value, flag in (
        ("model_config.enforce_eager", False, "--enforce-eager.*VLMPRUNE_ROUTE=probe"),
        ("parallel_config.pipeline_parallel_size", 2, "pipeline parallel size must be 1"),
        ("cache_config.cache_dtype", "fp8", "--kv-cache-dtype auto"),
    ):
        bad = copy.copy(config)
        section, name = attr.split(".")
        part = copy.copy(getattr(config, section))
        object.__setattr__(part, name, value)
        object.__setattr__(bad, section, part)
        with pytest.raises(RuntimeError, match=flag):
            engine_checks.check_engine_in_llm(bad, "m")


def test_prompt_the_stages_cannot_serve_is_refused_for_that_request_only(env):
    """TransPrune with nothing after the image: the processor refuses that request (vLLM's API
    server answers 400) instead of the stage failing inside the forward, which would stop the
    engine; the next request is served."""
    from vlmprune.policy import PolicyError

    bad = dict(make_spec(env.processor, policy={"method": "transprune", "ratio": 0.5}), text="USER: <image>")
    with pytest.raises(PolicyError, match="needs instruction text after the last image"):
        env.engine.llm.generate([vllm_request(bad)], inllm_sampling(), use_tqdm=False)
    fastv = dict(bad, vlmprune={"method": "fastv", "ratio": 0.5})  # fastv needs no instruction rows
    (_,), (record,) = run(env, [fastv])
    assert record is not None
    (out,), _ = run(env, [make_spec(env.processor)])
    assert_same_output(dict(out, token_ids=out["token_ids"][:4], logprobs=out["logprobs"][:4]), env.stock["one"])
