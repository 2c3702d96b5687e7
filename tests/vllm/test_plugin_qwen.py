"""The vLLM plugin on tiny Qwen2-VL and Qwen2.5-VL models, in real vLLM CPU engines.

Two parts. The M-RoPE position functions of :mod:`vlmprune.vllm_plugin.qwen2_vl` against stock
vLLM's own ``get_mrope_input_positions`` and against every chunking a prefill can have (no engine).
Then one plugin engine per family (module-scoped, one at a time) with a stock engine (plugin
excluded) in a background subprocess, compared with stock vLLM and with the transformers reference
backend on the same weights.

Images: a portrait 112x168 px (6x4 = 24 merged tokens) and a landscape 168x112 px (4x6). The
engines run chunked prefill with ``max_num_batched_tokens=32`` (``ENGINE_KWARGS``), so the second
image of a two-image prompt is split over two prefill chunks: every comparison with the reference
backend (which never chunks) also checks the position recompute across chunks.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import Engine, StockRun, assert_same_output, build_model, hf_request
from engine_helpers import ROUTE_PROBE

from vlmprune.policy import PolicyError, kept_count, parse_policy
from vlmprune.trace import TRACE_DIR_ENV, pop_trace
from vlmprune.vllm_plugin.mrope import (
    POSITION_CHANNELS,
    decode_position_channels,
    encode_position_channels,
    grid_positions,
    mrope_input_positions,
    recompute_positions,
)
from vlmprune.vllm_plugin.qwen2_vl import PrunedQwen2_5_VL, PrunedQwen2VL, position_log, start_position_log

IMG_P = (112, 168, 1)  # portrait: h 6 x w 4 merged tokens
IMG_L = (168, 112, 2)  # landscape: 4 x 6
N_IMG = 24
IMAGE_PAD, VIDEO_PAD, VISION_START = 900, 901, 902  # token ids of the pure tests (any distinct ids)


# --- Pure position tests (no engine) ------------------------------------------------------------


def _feature(offset: int, length: int, grid: tuple[int, int, int], modality: str = "image", seconds=None):
    data = {f"{modality}_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
    if seconds is not None:
        data["second_per_grid_ts"] = SimpleNamespace(data=torch.tensor(seconds))
    return SimpleNamespace(modality=modality, mm_position=SimpleNamespace(offset=offset, length=length), data=data)


def _fake_model(stock_cls, tokens_per_second=None):
    """Enough of a model for the (pure) position methods: its config and ``iter_mm_grid_thw``."""
    vision = SimpleNamespace(spatial_merge_size=2)
    if tokens_per_second is not None:
        vision.tokens_per_second = tokens_per_second
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    fake.iter_mm_grid_thw = lambda feats: stock_cls.iter_mm_grid_thw(fake, feats)
    return fake


@pytest.mark.parametrize(
    "cls, media",
    [
        (PrunedQwen2VL, [("image", (1, 12, 8), None)]),
        (PrunedQwen2VL, [("image", (1, 8, 12), None), ("image", (1, 12, 8), None), ("image", (1, 4, 4), None)]),
        (PrunedQwen2_5_VL, [("image", (1, 12, 8), None), ("video", (3, 8, 4), 0.75), ("image", (1, 8, 12), None)]),
    ],
    ids=["qwen2_vl-portrait", "qwen2_vl-three-images", "qwen2_5_vl-video-between-images"],
)
def test_unpruned_initial_positions_equal_stock_vllm(cls, media):
    """With full placeholder runs the initial positions and delta are stock vLLM's, bit for bit."""
    stock_cls = cls.__mro__[2]  # the stock vLLM class the plugin subclasses
    fake = _fake_model(stock_cls, tokens_per_second=2.0 if cls is PrunedQwen2_5_VL else None)
    features, cursor = [], 3
    for modality, grid, seconds in media:
        n = grid[0] * grid[1] * grid[2] // 4
        features.append(_feature(cursor, n, grid, modality, seconds))
        cursor += n + 5  # vision_end + 3 words + vision_start
    tokens = [0] * (cursor + 4)
    want, want_delta = stock_cls.get_mrope_input_positions(fake, tokens, features)
    got, delta = cls.get_mrope_input_positions(fake, tokens, features)
    assert torch.equal(got, torch.as_tensor(want)) and delta == want_delta


def _prompt(runs: list[int], text: list[int]) -> list[int]:
    """text[0] words, then per run: <|vision_start|>, ``n`` pads, <|vision_end|>, text[i+1] words."""
    ids = [1] * text[0]
    for n, words in zip(runs, text[1:]):
        ids += [VISION_START] + [IMAGE_PAD] * n + [3] + [1] * words
    return ids


def _runs(ids: list[int]) -> list[int]:
    return [i for i, t in enumerate(ids) if t == IMAGE_PAD and (i == 0 or ids[i - 1] != IMAGE_PAD)]


def test_recompute_is_exact_for_every_chunking_and_prefix_hit():
    """Pruned runs: whatever the chunk size and wherever a prefix-cache hit ends, every token's final
    id is the unpruned one (kept image tokens: base + their own (t, h, w); text: Qwen's rule)."""
    rng = random.Random(0)
    grids = [(1, 6, 4), (1, 4, 6), (1, 3, 3)]
    keeps = [7, 24, 1]  # pruned, unpruned, one token kept
    chosen = [sorted(rng.sample(range(g[1] * g[2]), k)) for g, k in zip(grids, keeps)]
    ids = _prompt(keeps, [3, 2, 0, 4])  # two adjacent-by-text runs and a run right after text
    starts = _runs(ids)
    media = [(s, k, *g, 1.0) for s, k, g in zip(starts, keeps, grids)]
    initial, _ = mrope_input_positions(len(ids), media)

    # Expected: stock positions of the unpruned prompt, gathered at the kept tokens.
    full_ids = _prompt([g[1] * g[2] for g in grids], [3, 2, 0, 4])
    full_media = [(s, g[1] * g[2], *g, 1.0) for s, g in zip(_runs(full_ids), grids)]
    full, full_delta = mrope_input_positions(len(full_ids), full_media)
    keep_rows = []
    for i, t in enumerate(full_ids):
        if t != IMAGE_PAD:
            keep_rows.append(i)
    for s, idx in zip(_runs(full_ids), chosen):
        keep_rows += [s + j for j in idx]
    expected = full[:, sorted(keep_rows)]

    channels = []
    for g, idx in zip(grids, chosen):
        thw = torch.from_numpy(grid_positions(*g).T.copy())[idx]
        channels.append(encode_position_channels(thw, torch.arange(len(idx)), torch.float32))

    for prefix in (0, 2, starts[0], starts[0] + 3, starts[1] - 1, starts[2] - 1, starts[2]):
        for chunk in range(1, len(ids) + 1):
            positions = initial.clone()
            for lo in range(prefix, len(ids), chunk):
                hi = min(lo + chunk, len(ids))
                window = [c[max(lo - s, 0) : hi - s] for s, c in zip(starts, channels) if s < hi and s + len(c) > lo]
                positions, delta = recompute_positions(
                    torch.tensor(ids), window, positions, lo, (IMAGE_PAD, VIDEO_PAD)
                )
            assert torch.equal(positions[:, prefix:], expected[:, prefix:]), (prefix, chunk)
    # The decode delta continues after the last prompt token exactly as in the unpruned prompt.
    assert int(positions.max()) + 1 == int(full.max()) + 1 == len(full_ids) + full_delta
    assert delta == int(full.max()) + 1 - len(ids)


def test_position_channels_are_exact_in_bfloat16():
    """Ids and row indices up to 32767 survive the embedding dtype (bfloat16 is exact only to 256)."""
    thw = torch.tensor([[0, 0, 0], [5, 131, 257], [4000, 255, 127], [32767, 1, 2]])
    rows = torch.tensor([0, 300, 16000, 32767])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        channels = encode_position_channels(thw, rows, dtype)
        assert channels.shape == (4, POSITION_CHANNELS)
        got_thw, got_rows = decode_position_channels(channels)
        assert torch.equal(got_thw, thw) and torch.equal(got_rows, rows), dtype
    with pytest.raises(ValueError, match="position ids"):
        encode_position_channels(torch.tensor([[0, 0, 40000]]), torch.tensor([0]), torch.float32)


# --- Engines ------------------------------------------------------------------------------------

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **ROUTE_PROBE}
"""Engine core in this process; the probe route (transprune / aim at the LLM input), which this
module tests (the in-LLM route: test_plugin_inllm*.py)."""


def qwen_spec(processor, prompt: str = "what colour is the box ?", images=(IMG_P,), policy="absent") -> dict:
    """A request spec whose ``text`` is the reference backend's own chat-templated prompt."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    out = {"prompt": prompt, "text": text, "images": [list(i) for i in images]}
    if policy != "absent":
        out["vlmprune"] = policy
    return out


def stock_specs(processor) -> list[dict]:
    return [qwen_spec(processor), qwen_spec(processor, "describe this image", images=(IMG_P, IMG_L))]


@pytest.fixture(scope="module", params=FAMILIES)
def env(request, tmp_path_factory, timings):
    """Plugin engine (position log on) + stock engine subprocess + reference backend, per family."""
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir, model, processor = build_model(family, root)
    # Engine core in this process (its worker is still a fresh process that loads the plugin through
    # the entry point): one process spawn less per engine on the shared 2-core machine. The position
    # log is read with apply_model, which ships a function to the worker (pickle).
    saved = {k: os.environ.get(k) for k in (*ENGINE_ENV, TRACE_DIR_ENV)}
    os.environ.update(ENGINE_ENV, **{TRACE_DIR_ENV: str(root / "traces")})
    stock = StockRun(model_dir, stock_specs(processor), root)
    try:
        engine = Engine(model_dir)
        assert engine.llm.apply_model(start_position_log) == [True]
    except BaseException:
        stock.stop()
        raise
    timings[f"{family}_plugin_engine_start_s"] = engine.start_s
    yield SimpleNamespace(
        family=family,
        engine=engine,
        stock=stock,
        ref=ReferenceBackend(model, processor),
        processor=processor,
        image_id=int(model.config.image_token_id),
    )
    engine.shutdown()
    stock.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def logged_positions(env, prompt_ids: list[int]) -> torch.Tensor:
    """The (3, L) positions the engine's last recompute of this prompt produced."""
    (log,) = env.engine.llm.apply_model(position_log)
    return torch.tensor(log[tuple(prompt_ids)])


def reference_positions(env, request_spec: dict, policy) -> torch.Tensor:
    """(3, L) positions the transformers reference backend gives the pruned prompt."""
    return env.ref.prefill([hf_request(request_spec)], policy)[0].sequence.positions


@pytest.mark.slow
def test_ratio0_and_no_policy_match_stock_vllm(env, timings):
    """No key, ``vlmprune: None`` and ratio 0 (any method) give stock vLLM's output token for token,
    and the M-RoPE positions are stock's (the stock transformers ``get_rope_index`` ids)."""
    stock = env.stock.result()
    timings[f"{env.family}_stock_engine_start_s"] = stock["start_s"]
    specs = stock_specs(env.processor)
    for policy in ("absent", None, {"method": "fastervlm", "ratio": 0.0}, {"method": "pool", "ratio": 0}):
        runs = [dict(s, **({} if policy == "absent" else {"vlmprune": policy})) for s in specs]
        for got, want in zip(env.engine.run(runs), stock["outputs"], strict=True):
            assert_same_output(got, want, atol=1e-6, what=f"{env.family} policy={policy}")
    for s, want in zip(specs, stock["outputs"]):
        got = logged_positions(env, want["prompt_token_ids"])
        assert torch.equal(got, reference_positions(env, s, parse_policy({"ratio": 0.0})))


# aim (merge + probe pruning to kept_count) is checked in test_plugin_probe.py: its vLLM count is not
# the reference backend's LLM-input count (the first stage of its in-LLM schedule).
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastervlm", "random", "pool"])
def test_exact_kept_counts(env, method):
    """Every method reserves exactly its count per image, the reference backend's prompt."""
    ratios = (0.25, 0.5, 0.9)
    specs = [qwen_spec(env.processor, images=(IMG_P, IMG_L), policy={"method": method, "ratio": r}) for r in ratios]
    for r, s, out in zip(ratios, specs, env.engine.run(specs)):
        pre = env.ref.prefill([hf_request(s)], parse_policy(s["vlmprune"]))[0]
        assert out["prompt_token_ids"] == pre.sequence.input_ids.tolist(), f"{method} ratio {r}"
        n_image = out["prompt_token_ids"].count(env.image_id)
        assert n_image == pre.kept_tokens
        if method != "aim":  # aim's input count comes from its layer schedule
            assert n_image == 2 * kept_count(N_IMG, r)


def _assert_matches_reference(env, s: dict, out: dict, atol: float) -> None:
    """Same prompt, same M-RoPE ids, same greedy tokens and logprobs (teacher-forced) as the reference."""
    policy = parse_policy(s["vlmprune"])
    pre = env.ref.prefill([hf_request(s)], policy)[0]
    what = f"{env.family} {s['vlmprune']} images={len(s['images'])}"
    assert out["prompt_token_ids"] == pre.sequence.input_ids.tolist(), what
    assert torch.equal(logged_positions(env, out["prompt_token_ids"]), pre.sequence.positions), what
    if policy.method == "aim":
        # The plugin runs AIM's merge stage only (its PageRank stage inside the LLM needs the probe);
        # the reference's own decoding would prune further, so run the stock LLM on its pruned input.
        logits = list(_stock_llm_logits(env, pre.sequence, out["token_ids"]))
    else:
        logits = [pre.logits] + list(pre.decoder.extend(out["token_ids"][:-1]))
    for step, (row, top) in enumerate(zip(logits, out["logprobs"])):
        ref = torch.log_softmax(row.float(), dim=-1)
        for token, lp in top.items():
            assert abs(float(ref[int(token)]) - lp) <= atol, f"{what}: step {step} token {token}: {float(ref[int(token)])} vs {lp}"
        # vLLM's greedy token is the reference's argmax (up to a tie within atol).
        assert float(ref[out["token_ids"][step]]) >= float(ref.max()) - atol, f"{what}: greedy token differs at step {step}"


def _stock_llm_logits(env, sequence, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) logits of the reference's stock text model over ``sequence`` + ``tokens[:-1]``."""
    adapter = env.ref.adapter
    with torch.no_grad():
        new = adapter.text_model.embed_tokens(torch.tensor(tokens[:-1], dtype=torch.long))  # (m, d)
        start = int(sequence.positions.max()) + 1
        new_positions = torch.arange(start, start + new.shape[0]).expand(3, -1)
        embeds = torch.cat([sequence.embeds, new])  # (L + m, d)
        positions = torch.cat([sequence.positions, new_positions], dim=1)  # (3, L + m)
        hidden = adapter.text_model(inputs_embeds=embeds[None], position_ids=positions[:, None]).last_hidden_state
        return adapter.lm_head(hidden[0, sequence.length - 1 :])


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_fastervlm_matches_reference_backend(env, ratio):
    """FasterVLM (mean attention received, pooled per merge group, window order undone on Qwen2.5)
    keeps the reference backend's tokens at the reference's positions: same greedy tokens and
    logprobs, with one and two images."""
    specs = [
        qwen_spec(env.processor, policy={"method": "fastervlm", "ratio": ratio}),
        qwen_spec(env.processor, "describe this image", images=(IMG_P, IMG_L), policy={"method": "fastervlm", "ratio": ratio}),
    ]
    for s, out in zip(specs, env.engine.run(specs)):
        _assert_matches_reference(env, s, out, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "pool"])  # aim: test_plugin_probe.py
def test_other_methods_match_reference_backend(env, method):
    """Random (same seed) and pool equal the reference backend at ratio 0.75."""
    s = qwen_spec(env.processor, images=(IMG_P, IMG_L), policy={"method": method, "ratio": 0.75})
    _assert_matches_reference(env, s, env.engine.run_one(s), atol=1e-4)


@pytest.mark.slow
def test_mixed_ratios_in_one_batch_and_same_request_twice(env):
    """One batch of mixed policies gives each request its own result (equal to running it alone);
    the same request sent twice (encoder, processor and prefix caches hit) gives the same output."""
    policies = [None, {"method": "fastervlm", "ratio": 0.9}, {"method": "pool", "ratio": 0.5}, {"method": "fastervlm", "ratio": 0.5}]
    specs = [qwen_spec(env.processor, "describe this image", images=(IMG_L, IMG_P), policy=p) for p in policies]
    batch = env.engine.run(specs)
    counts = [o["prompt_token_ids"].count(env.image_id) for o in batch]
    assert counts == [48, 2 * kept_count(N_IMG, 0.9), 2 * kept_count(N_IMG, 0.5), 2 * kept_count(N_IMG, 0.5)]
    for s, got in zip(specs, batch):
        assert_same_output(env.engine.run_one(s), got, atol=1e-5, what=f"alone vs batch {s.get('vlmprune')}")
    again = env.engine.run([specs[1], specs[1]])
    assert_same_output(again[0], batch[1], atol=1e-5, what="same request twice")
    assert_same_output(again[1], batch[1], atol=1e-5, what="same request twice")


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy, match",
    [
        ({"method": "globalcom2", "ratio": 0.5}, "globalcom2"),
        ({"method": "fastervlm", "ratio": 1.5}, "ratio"),
        ({"method": "fastervlm", "ratio": 0.5, "bogus": 1}, "bogus"),
        ({"method": "transprune", "ratio": 0.5}, "transprune"),
    ],
    ids=["wrong-family", "ratio-out-of-range", "unknown-option", "needs-probe"],
)
def test_bad_policy_fails_only_that_request(env, policy, match):
    """A bad policy is rejected (PolicyError naming the field or method) and the engine keeps serving."""
    with pytest.raises(PolicyError, match=match):
        env.engine.run_one(qwen_spec(env.processor, policy=policy))
    good = qwen_spec(env.processor, policy={"method": "fastervlm", "ratio": 0.5})
    out = env.engine.run_one(good)
    assert out["prompt_token_ids"].count(env.image_id) == kept_count(N_IMG, 0.5)



@pytest.mark.slow
def test_trace_records_the_reference_selection_on_the_merged_grid(env):
    """A traced request: the engine records the merged tokens it kept (the reference backend's
    FasterVLM choice) and the merged grid (rows x cols) that places them on the image."""
    from pathlib import Path

    from vlmprune.testbed.tiny import make_image
    from vlmprune.visualize import visualize

    s = qwen_spec(env.processor, policy={"method": "fastervlm", "ratio": 0.75, "trace": "qwen-trace-1"})
    env.engine.run_one(s)
    (record,) = pop_trace(Path(os.environ[TRACE_DIR_ENV]), "qwen-trace-1", 1)
    w, h, seed = IMG_P
    _, ref = visualize(env.ref, make_image(w, h, seed=seed), parse_policy({"method": "fastervlm", "ratio": 0.75}),
                       s["prompt"])
    assert record["grid"] == [6, 4] and record["n_tokens"] == N_IMG and record["prunable"] is None
    assert len(record["kept"]) == kept_count(N_IMG, 0.75) and record["kept"] == ref["kept_indices"]
