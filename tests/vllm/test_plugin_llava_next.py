"""The vLLM plugin on a tiny LLaVA-NeXT (AnyRes: 4x4 base view + up to 2x2 crops, newline tokens).

This engine also carries an active engine-wide default policy (``--mm-processor-kwargs``
``{"vlmprune": {"method": "fastervlm", "ratio": 0.5}}``): requests that omit the key are pruned by
it, every request is merged over it, and the engine's start-up (profiling with dummy images) runs
under it. Chunked prefill with 32-token chunks
splits every image (about 70 placeholders) over several prefill steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import ROUTE_PROBE, Engine, StockRun, assert_same_output, build_model, hf_request, median_latency, saved_env, spec

from vlmprune.policy import kept_count, parse_policy
from vlmprune.trace import TRACE_DIR_ENV, pop_trace

pytestmark = pytest.mark.slow

IMG_A = (96, 64, 1)  # landscape: 2 crops wide
IMG_B = (64, 96, 2)  # portrait
IMG_C = (90, 90, 3)  # square: 2x2 crops
TWO = (IMG_A, IMG_B)
DEFAULT = {"vlmprune": {"method": "fastervlm", "ratio": 0.5}}
STOCK_SPECS = [spec(), spec(prompt="which colour is the box ?", images=TWO), spec(images=(IMG_C,))]


@pytest.fixture(scope="module")
def env(tmp_path_factory, timings):
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    root = tmp_path_factory.mktemp("llava_next_vllm")
    model_dir, model, processor = build_model("llava_next", root)
    stock = StockRun(model_dir, STOCK_SPECS, root)
    saved_trace_dir = os.environ.get(TRACE_DIR_ENV)
    os.environ[TRACE_DIR_ENV] = str(root / "traces")  # front end (this process) and worker
    with saved_env(ROUTE_PROBE):  # transprune / aim at the LLM input (in-LLM route: test_plugin_inllm_next.py)
        try:
            engine = Engine(model_dir, mm_processor_kwargs=DEFAULT)
        except BaseException:
            stock.stop()
            raise
        timings["plugin_engine_start_s"] = engine.start_s
        yield SimpleNamespace(engine=engine, stock=stock, ref=ReferenceBackend(model, processor), tokenizer=processor.tokenizer)
        engine.shutdown()
        stock.stop()
    if saved_trace_dir is None:
        os.environ.pop(TRACE_DIR_ENV, None)
    else:
        os.environ[TRACE_DIR_ENV] = saved_trace_dir


def n_image_tokens(env, out) -> int:
    return out["prompt_token_ids"].count(env.tokenizer.convert_tokens_to_ids("<image>"))


def test_ratio0_and_none_match_stock_vllm_token_for_token(env, timings):
    """``vlmprune: None`` and ratio 0 (explicit, or merged over the default) give stock vLLM's exact
    output (stock: the plugin excluded with VLLM_PLUGINS, no engine default)."""
    stock = env.stock.result()
    timings["stock_engine_start_s"] = stock["start_s"]
    for policy in (None, {"ratio": 0.0}, {"method": "pool", "ratio": 0.0}, {"method": "globalcom2", "ratio": 0.0}):
        for base, want in zip(STOCK_SPECS, stock["outputs"]):
            got = env.engine.run_one(dict(base, vlmprune=policy))
            assert_same_output(got, want, atol=1e-6, what=f"policy={policy}")


# aim (merge + probe pruning to kept_count) is checked in test_plugin_probe.py: its vLLM count is not
# the reference backend's LLM-input count (the first stage of its in-LLM schedule).
@pytest.mark.parametrize("method", ["fastervlm", "globalcom2", "random", "pool"])
def test_prompt_equals_reference_backend_sequence(env, method):
    """Pruned prompts (three image shapes) equal the reference backend's: kept base + crop tokens
    (``kept_count`` of every view, as FasterVLM's official code budgets them), every newline kept,
    GlobalCom2's per-crop budgets summing exactly to the fixed total."""
    cases = [(images, r) for images in (TWO, (IMG_C,)) for r in (0.25, 0.5, 0.9)]
    specs = [spec(prompt="which colour is the box ?", images=im, policy={"method": method, "ratio": r}) for im, r in cases]
    outs = env.engine.run(specs)
    for (images, r), s, out in zip(cases, specs, outs):
        pre = env.ref.prefill([hf_request(s)], parse_policy(s["vlmprune"]))[0]
        assert out["prompt_token_ids"] == pre.sequence.input_ids.tolist(), f"{method} ratio {r}"
        assert n_image_tokens(env, out) == pre.kept_tokens + pre.fixed_tokens
        if len(images) == 1:  # one image: kept_count of each view (thumbnail, every crop) + newlines
            ((_, (image,)),) = env.ref.sequences([hf_request(s)])
            assert pre.kept_tokens == sum(kept_count(n, r) for n in image.view_sizes)
            assert len(image.view_sizes) == 5  # the square image: thumbnail + 2x2 crops


@pytest.mark.parametrize("method", ["fastervlm", "globalcom2", "random", "pool"])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_pruned_output_matches_reference_backend(env, method, ratio):
    """Same kept tokens as the transformers backend -> same greedy tokens, close logprobs.

    ``globalcom2`` scores with the last ViT layer's [CLS] logits, a layer vLLM's tower does not
    build: the plugin's ``FinalLayerQK`` computes them from the checkpoint's weights."""
    s = spec(prompt="which colour is the box ?", images=TWO, policy={"method": method, "ratio": ratio})
    got = env.engine.run_one(s)
    policy = parse_policy(s["vlmprune"])
    want = env.ref.generate([hf_request(s)], policy, max_new_tokens=len(got["token_ids"]))[0]
    assert got["token_ids"][: len(want.token_ids)] == want.token_ids
    logp = torch.log_softmax(env.ref.prefill([hf_request(s)], policy)[0].logits.float(), dim=-1)
    for token, value in got["logprobs"][0].items():
        assert abs(value - float(logp[int(token)])) < 1e-3, f"token {token}"
    assert len(got["prompt_token_ids"]) > 32  # prefilled in chunks of 32


def test_engine_default_applies_and_requests_merge_over_it(env):
    """No key -> the default policy; ``{"ratio": 0.9}`` keeps the default's method (vLLM merges
    nested kwargs recursively); ``None`` -> no pruning."""
    absent = env.engine.run_one(spec())
    assert_same_output(absent, env.engine.run_one(spec(policy={"method": "fastervlm", "ratio": 0.5})), atol=1e-5, what="default")
    merged = env.engine.run_one(spec(policy={"ratio": 0.9}))
    assert_same_output(merged, env.engine.run_one(spec(policy={"method": "fastervlm", "ratio": 0.9})), atol=1e-5, what="merged")
    full = n_image_tokens(env, env.engine.run_one(spec(policy=None)))
    assert full > n_image_tokens(env, absent) > n_image_tokens(env, merged)


def test_mixed_batch_matches_requests_run_alone(env):
    """Methods and ratios mixed in one generate() batch give each request's solo output."""
    specs = [
        spec(policy={"method": "globalcom2", "ratio": 0.75, "alpha": 0.3}),
        spec(images=TWO, policy={"method": "fastervlm", "ratio": 0.9}),
        spec(images=(IMG_C,), policy={"method": "random", "ratio": 0.5}),
        spec(policy="absent"),
        spec(policy=None),
        spec(images=(IMG_B, IMG_C), policy={"method": "pool", "ratio": 0.5}),
        spec(images=(IMG_C,), policy={"method": "aim", "ratio": 0.5, "instruction": "what is this ?"}),
    ]
    batch = env.engine.run(specs)
    for s, got in zip(specs, batch):
        assert_same_output(got, env.engine.run_one(s), atol=1e-4, what=str(s.get("vlmprune")))


def test_same_image_at_several_ratios_and_repeated_requests_are_consistent(env):
    """One image at ratios 0 / 0.5 / 0.9 (globalcom2) in one batch, twice (cache hits): counts follow
    the ratio and the repeat reproduces the first run."""
    specs = [spec(images=(IMG_C,), policy={"method": "globalcom2", "ratio": r}) for r in (0.0, 0.5, 0.9)]
    first = env.engine.run(specs)
    again = env.engine.run(specs)
    counts = [n_image_tokens(env, o) for o in first]
    assert counts[0] > counts[1] > counts[2]
    for a, b in zip(first, again):
        assert_same_output(b, a, atol=1e-5, what="repeat")


BAD = [
    ({"method": "globalcom2", "ratio": 1.5}, r"field 'ratio'.*1\.5"),
    ({"method": "nope"}, r"unknown method 'nope'"),
    ({"method": "fastervlm", "ratio": 0.5, "alpha": 0.3}, r"unknown option 'alpha' for method 'fastervlm'"),
    ({"method": "globalcom2", "ratio": 0.5, "temperature": 0}, r"field 'temperature'"),
    ({"method": "explain", "ratio": 0.5}, r"method 'explain' needs the instruction probe"),
]


@pytest.mark.parametrize("policy,message", BAD, ids=[m.split("'")[1] for _, m in BAD])
def test_bad_policy_fails_that_request_and_the_engine_keeps_serving(env, policy, message):
    """A bad policy raises a ValueError naming the problem for its request; the engine serves on."""
    good = spec(images=(IMG_C,), policy={"method": "globalcom2", "ratio": 0.5})
    before = env.engine.run_one(good)
    with pytest.raises(ValueError, match=message):
        env.engine.run([good, spec(policy=policy)])
    assert_same_output(env.engine.run_one(good), before, atol=1e-5, what="after the error")


def test_latency_ratio0_vs_0_9(env, timings):
    """Per-request latency of one image at ratio 0 and 0.9 (measured, see the timings line).

    The tiny model is overhead-dominated, so pruning cannot be expected to be faster here; the
    check bounds the plugin's own per-request overhead (hooks, scoring, selection)."""
    env.engine.run_one(spec())  # warm-up
    t0, t9 = median_latency(env.engine, (90, 90), 0.0, 0), median_latency(env.engine, (90, 90), 0.9, 10)
    timings["latency_ratio0_s"], timings["latency_ratio0.9_s"] = t0, t9
    assert t9 < t0 + 0.25


def test_trace_records_the_reference_selection_with_thumbnail_and_crop_geometry(env):
    """A traced request: the engine records the prunable tokens it kept (the reference backend's
    FasterVLM choice; newline tokens never listed) and the per-token views and coordinates that
    place every prunable token on the thumbnail panel or the crops panel."""
    from vlmprune.testbed.tiny import make_image
    from vlmprune.visualize import layout_of, visualize

    policy = {"method": "fastervlm", "ratio": 0.75}
    env.engine.run_one(spec(images=(IMG_C,), policy={**policy, "trace": "next-trace-1"}))
    (record,) = pop_trace(Path(os.environ[TRACE_DIR_ENV]), "next-trace-1", 1)
    w, h, seed = IMG_C
    _, ref = visualize(env.ref, make_image(w, h, seed=seed), parse_policy(policy), "what is this ?")
    prunable = record["prunable"]
    assert len(prunable) == ref["visual_tokens"] < record["n_tokens"]  # newlines are not prunable
    assert len(record["kept"]) == kept_count(len(prunable), 0.75) and record["kept"] == ref["kept_indices"]
    layout = layout_of("llava_next", record["n_tokens"], record["grid"], (w, h), view=record["view"],
                       coords=record["coords"], view_shape=record["view_shape"])
    assert [p.name.split()[0] for p in layout.panels] == ["base", "AnyRes"]
    assert sorted(t for p in layout.panels for t in p.tokens.tolist()) == prunable
