"""The instruction-aware methods in vLLM (``transprune``, ``aim``'s prune stage, ``explain``): the shallow probe.

One real vLLM CPU engine per family (tiny LLaVA-1.5 with 36 visual tokens per image, LLaVA-NeXT
with AnyRes crops and newline tokens, Qwen2-VL and Qwen2.5-VL with 24 merged tokens and M-RoPE),
module-scoped, one at a time, engine core in this process. Each engine runs
with an engine-wide default policy of another method (``aim`` at ratio 0 with its own options), so
every request below that names ``transprune``, ``explain`` or ``fastervlm`` also checks that the
default's method-specific options are dropped for it (they would otherwise fail as unknown options).

The agreement check: the model records what its probe saw (rows, positions, instruction ids) and
the scores it computed (``probe.start_probe_log``); the test recomputes the scores with the
transformers reference model's own decoder layers and :mod:`vlmprune.signals` /
:mod:`vlmprune.core` on the same sequence, and they must agree.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import ROUTE_PROBE, Engine, assert_same_output, build_model, hf_request

from vlmprune.backends.hf import progressive
from vlmprune.core import aim, transprune
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.core.select import topk_sorted
from vlmprune.policy import PolicyError, image_kept_count, parse_policy
from vlmprune.reduction.ttv_capture import SubBlockCapture
from vlmprune.signals.attention import attention_logits, instruction_attention
from vlmprune.vllm_plugin import request_policy
from vlmprune.vllm_plugin.probe import EXPLAIN_CHECKPOINT, probe_log, start_probe_log
from vlmprune.vllm_plugin.mrope import grid_positions

pytestmark = pytest.mark.slow

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **ROUTE_PROBE}
"""Engine core in this process; the probe route (transprune / aim at the LLM input), which this
module tests (the in-LLM route: test_plugin_inllm*.py)."""
DEFAULT = {"method": "aim", "ratio": 0.0, "merge_keep": 0.5, "pagerank_iterations": 3}
"""Engine default: a no-op (ratio 0) whose options no other method has."""
METHODS = ("transprune", "aim", "explain")
QUESTION = "what colour is the box ?"
OTHER_QUESTION = "how many circle are on the left ?"
IMAGES = {
    "llava": ((96, 64, 1), (64, 96, 2)),  # 36 tokens each
    "llava_next": ((96, 64, 1), (64, 96, 2)),  # AnyRes: base + crops, plus newline tokens
    "qwen2_vl": ((112, 168, 1), (168, 112, 2)),  # 24 merged tokens each
    "qwen2_5_vl": ((112, 168, 1), (168, 112, 2)),
}


# --- No engine: the engine-default merge -----------------------------------------------------------


def test_request_naming_another_method_drops_the_defaults_options():
    """A request's method other than the default's keeps only the default options its method has."""
    from vllm.config.multimodal import MultiModalConfig

    mm = MultiModalConfig(mm_processor_kwargs={"vlmprune": {"method": "aim", "ratio": 0.3, "merge_keep": 0.5, "probe_layers": 3}})
    got = request_policy.merged_request(mm, {"vlmprune": {"method": "transprune", "instruction": "x"}})
    assert got.policy == parse_policy({"method": "transprune", "ratio": 0.3, "probe_layers": 3})
    assert got.instruction == "x"
    got = request_policy.merged_request(mm, {"vlmprune": {"method": "fastervlm", "ratio": 0.9}})
    assert got.policy == parse_policy({"method": "fastervlm", "ratio": 0.9})
    # Same method (named or not): vLLM's recursive merge, the default's options stay.
    got = request_policy.merged_request(mm, {"vlmprune": {"ratio": 0.9}})
    assert (got.policy.method, got.policy.merge_keep, got.policy.ratio) == ("aim", 0.5, 0.9)
    got = request_policy.merged_request(mm, {"vlmprune": {"method": "aim", "pagerank_iterations": 2}})
    assert (got.policy.merge_keep, got.policy.pagerank_iterations, got.policy.ratio) == (0.5, 2, 0.3)
    assert request_policy.merged_request(mm, {"vlmprune": None}).policy is None
    assert request_policy.merged_request(mm, {}).policy.method == "aim"
    # A default given as a JSON string (command line) and a default naming no method (fastervlm).
    mm = MultiModalConfig(mm_processor_kwargs={"vlmprune": '{"method": "random", "seed": 4, "ratio": 0.5}'})
    assert request_policy.merged_request(mm, {"vlmprune": {"method": "pool"}}).policy == parse_policy({"method": "pool", "ratio": 0.5})
    mm = MultiModalConfig(mm_processor_kwargs={"vlmprune": {"ratio": 0.5}})
    assert request_policy.merged_request(mm, {"vlmprune": {"method": "random", "seed": 1}}).policy.seed == 1
    # A bad option of the request's own method is still an error.
    with pytest.raises(PolicyError, match="unknown option 'seed' for method 'pool'"):
        request_policy.merged_request(mm, {"vlmprune": {"method": "pool", "seed": 1}})


# --- Engines ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(IMAGES))
def env(request, tmp_path_factory, timings):
    """Plugin engine (engine default: ``DEFAULT``) + reference backend + explain CNN, per family."""
    from vlmprune.backends.hf.pipeline import ReferenceBackend

    family = request.param
    root = tmp_path_factory.mktemp(f"probe_{family}")
    model_dir, model, processor = build_model(family, root)
    torch.manual_seed(0)
    cnn = RelevanceCNN(RelevanceCNNConfig(channels=(8, 16), kernel_size=3)).eval()
    cnn.save(model_dir / EXPLAIN_CHECKPOINT)
    saved = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    try:
        engine = Engine(model_dir, mm_processor_kwargs={"vlmprune": DEFAULT})
        assert engine.llm.apply_model(start_probe_log) == [True]
        timings[f"{family}_engine_start_s"] = engine.start_s
        tokenizer = processor.tokenizer
        image_id = int(model.config.image_token_id)
        yield SimpleNamespace(
            family=family,
            model_dir=model_dir,
            engine=engine,
            ref=ReferenceBackend(model, processor),
            processor=processor,
            tokenizer=tokenizer,
            cnn=cnn,
            image_id=image_id,
            images=IMAGES[family],
            parts={},
        )
        engine.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_spec(env, prompt: str = QUESTION, images=None, policy="absent") -> dict:
    """A request spec in the family's own prompt format (the reference backend's chat template)."""
    images = env.images[:1] if images is None else images
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = env.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    out = {"prompt": prompt, "text": text, "images": [list(i) for i in images]}
    if policy != "absent":
        out["vlmprune"] = policy
    return out


def fresh_image(env, seed: int) -> tuple[int, int, int]:
    """An image (the family's first size) that no other test sends: a test reading the probe log
    must not hit the encoder cache filled by another test's identical image + policy."""
    return (*env.images[0][:2], seed)


def probe_policy(method: str, ratio: float, instruction: str | None = QUESTION, **options) -> dict:
    policy = {"method": method, "ratio": ratio, **options}
    if instruction is not None:
        policy["instruction"] = instruction
    return policy


def parts(env, image) -> tuple[tuple[int, ...], int]:
    """(prunable tokens per view, always-kept tokens) of one image, from the transformers reference backend."""
    key = tuple(image)
    if key not in env.parts:
        inputs = env.ref.process([hf_request({"prompt": QUESTION, "images": [list(image)]})])
        (tokens,) = env.ref.adapter.encode_images(inputs, frozenset())
        env.parts[key] = (tokens.view_sizes, tokens.n_tokens - tokens.n_prunable)
    return env.parts[key]


def count(env, image, ratio: float) -> int:
    """Placeholders of one image in vLLM: kept_count of each view's prunable tokens + its fixed tokens."""
    views, fixed = parts(env, image)
    return image_kept_count(views, ratio) + fixed


def read_log(env) -> list[dict]:
    """The probe records since the last read (the read empties the log)."""
    (records,) = env.engine.llm.apply_model(probe_log)
    return records


@pytest.fixture(autouse=True)
def _empty_probe_log(request):
    """Every engine test starts with an empty probe log (a failed test may leave records behind)."""
    if "env" in request.fixturenames:
        read_log(request.getfixturevalue("env"))


def test_exact_kept_counts(env):
    """Every probe method reserves exactly kept_count(n, ratio) tokens per image (two images), the
    prompt is the stock prompt with shorter image runs, and the gateway reports the same count."""
    from server.model_info import ServedModel

    served = ServedModel(env.model_dir)
    ratios = (0.25, 0.5, 0.9)
    specs = [
        make_spec(env, images=env.images, policy=probe_policy(m, r)) for m in METHODS for r in ratios
    ]
    outs = env.engine.run(specs)
    stock = env.engine.run_one(make_spec(env, images=env.images))["prompt_token_ids"]
    text = [t for t in stock if t != env.image_id]
    for s, out in zip(specs, outs):
        ids = out["prompt_token_ids"]
        r = s["vlmprune"]["ratio"]
        assert ids.count(env.image_id) == sum(count(env, im, r) for im in s["images"]), s["vlmprune"]
        assert [t for t in ids if t != env.image_id] == text
        policy = parse_policy({k: v for k, v in s["vlmprune"].items() if k != "instruction"})
        tokens = [served.image_tokens(w, h) for w, h, _ in s["images"]]
        gateway = sum(served.plan(policy, t).prompt_tokens for t in tokens)
        assert gateway == ids.count(env.image_id), s["vlmprune"]
    read_log(env)  # clear


def _reference_scores(env, record: dict, policy) -> torch.Tensor:
    """The method's scores of the probed prunable rows, from the transformers model's own layers."""
    text_model = env.ref.adapter.text_model
    rows, positions, ids = record["rows"], record["positions"], record["instruction_ids"]
    layers = record["layers"]
    with torch.no_grad():
        embeds = torch.cat([rows, text_model.embed_tokens(ids)])  # (L, d)
        length, n = embeds.shape[0], rows.shape[0]
        hidden = embeds[None]
        rope = progressive._rotary(text_model, hidden, positions)
        mask = progressive._causal_mask(progressive._attn_impl(text_model), length, length, hidden.dtype, hidden.device)
        instr = torch.arange(n, length)
        ttv = torch.zeros(length)
        for idx in range(layers):
            layer = text_model.layers[idx]
            if idx == layers - 1:
                iga = instruction_attention(layer, hidden[0], rope, instr)  # (L,)
                logits = attention_logits(layer, hidden[0], rope)  # (H, L, L)
            with SubBlockCapture(layer, batched=True) as cap:
                hidden = progressive._call_layer(layer, hidden, mask, rope, None)
            ttv += cap.ttv(getattr(policy, "direction", "one_minus_cos"))
    cand = record["prunable"].nonzero().squeeze(1)
    if policy.method == "transprune":
        return transprune.combine(ttv[cand], iga[cand])
    if policy.method == "aim":
        return aim.pagerank_importance(logits, policy.pagerank_temperature, policy.pagerank_iterations)[cand]
    return env.cnn.relevance(iga[cand])


@pytest.mark.parametrize("method,options", [
    ("transprune", {}),
    ("transprune", {"probe_layers": 3, "direction": "one_minus_abs_cos"}),
    ("aim", {}),
    ("explain", {}),
], ids=["transprune", "transprune-3-layers", "aim", "explain"])
def test_probe_scores_equal_the_transformers_reference(env, timings, method, options):
    """vLLM's probe (its own layers, outside the paged cache) scores every probed row as the
    transformers reference layers + vlmprune.signals do, and keeps the reference's top rows."""
    s = make_spec(env, images=env.images, policy=probe_policy(method, 0.75, **options))
    out = env.engine.run_one(s)
    records = read_log(env)
    assert len(records) == 2 and all(r["method"] == method for r in records)
    given = {k: v for k, v in s["vlmprune"].items() if k != "instruction"}
    policy = parse_policy({**DEFAULT, **given} if method == "aim" else given)  # aim: the default's options apply
    want_ids = env.tokenizer.encode(QUESTION, add_special_tokens=False)
    inputs = env.ref.process([hf_request(s)])
    ref_images = env.ref.adapter.encode_images(inputs, frozenset())
    for i, record in enumerate(records):
        assert record["instruction_ids"].tolist() == want_ids
        assert record["layers"] == (1 if method == "explain" else policy.probe_layers)
        m, t = record["rows"].shape[0], len(want_ids)
        positions = record["positions"]
        if positions.ndim == 1:  # LLaVA: the re-indexed rows, then the instruction
            assert positions.tolist() == list(range(m + t))
        else:  # Qwen: the image's (t, h, w) ids from 0, the instruction after the grid's largest id
            grid = torch.from_numpy(grid_positions(1, *ref_images[i].grid))  # (3, N)
            start = int(grid.max()) + 1
            assert positions[:, m:].tolist() == [list(range(start, start + t))] * 3
            if method != "aim":
                assert torch.equal(positions[:, :m], grid)
        if method != "aim":  # the probe saw the image's own rows: the reference model's projected features
            torch.testing.assert_close(record["rows"], ref_images[i].features, atol=1e-4, rtol=1e-4)
        want = _reference_scores(env, record, policy)
        torch.testing.assert_close(record["scores"], want.float(), atol=1e-6, rtol=1e-3)
        rel = 1e6 * float(((record["scores"] - want.float()).abs() / want.float().abs().clamp_min(1e-12)).max())
        name = f"{env.family}_{method}{options.get('probe_layers', '')}_score_max_rel_diff_ppm"
        timings[name] = max(timings.get(name, 0.0), rel)
        prunable = record["prunable"]
        keep = image_kept_count(parts(env, s["images"][i])[0], 0.75)
        chosen = prunable.nonzero().squeeze(1)[topk_sorted(want, keep)]
        kept = record["kept"]
        assert kept[prunable[kept]].tolist() == chosen.tolist()
        assert set((~prunable).nonzero().squeeze(1).tolist()) <= set(kept.tolist())  # newlines stay
    assert out["prompt_token_ids"].count(env.image_id) == sum(count(env, im, 0.75) for im in s["images"])


@pytest.mark.parametrize("method", METHODS)
def test_missing_instruction_fails_that_request_and_the_engine_serves_on(env, method):
    """No (or a blank) instruction: a PolicyError naming the field; the engine keeps serving."""
    good = make_spec(env, policy=probe_policy(method, 0.5))
    before = env.engine.run_one(good)
    for policy in (probe_policy(method, 0.5, instruction=None), probe_policy(method, 0.5, instruction="  ")):
        with pytest.raises(PolicyError, match=rf"method '{method}' needs the instruction probe's text: field 'instruction'"):
            env.engine.run([good, make_spec(env, policy=policy)])
    assert_same_output(env.engine.run_one(good), before, atol=1e-5, what="after the error")
    read_log(env)


@pytest.mark.parametrize(
    "policy,message",
    [
        (probe_policy("explain", 0.5, checkpoint="/no/such/cnn.pt"), r"field 'checkpoint': no such file.*/no/such/cnn\.pt"),
        (probe_policy("transprune", 0.5, probe_layers=8), r"field 'probe_layers': must be <= 4.*got 8"),
        (probe_policy("aim", 0.5, probe_layers=5), r"field 'probe_layers'"),
    ],
    ids=["explain-missing-checkpoint", "transprune-too-deep", "aim-too-deep"],
)
def test_unservable_probe_policy_fails_that_request(env, policy, message):
    """A missing CNN file or a probe deeper than the model fails its request with the field named."""
    with pytest.raises(PolicyError, match=message):
        env.engine.run_one(make_spec(env, policy=policy))
    out = env.engine.run_one(make_spec(env, policy=probe_policy("explain", 0.5)))
    assert out["prompt_token_ids"].count(env.image_id) == count(env, env.images[0], 0.5)
    read_log(env)


def test_two_instructions_on_one_image_are_two_cache_entries(env):
    """Same image, two instructions: different decisions, and in one batch (and repeated, from the
    caches) each gives exactly its solo output. (``explain``: its score is the instruction's
    attention alone; TransPrune's TTV term does not depend on text that follows the image.)"""
    image = fresh_image(env, 7)
    a = make_spec(env, images=(image,), policy=probe_policy("explain", 0.75, instruction=QUESTION))
    b = make_spec(env, images=(image,), policy=probe_policy("explain", 0.75, instruction=OTHER_QUESTION))
    alone_a = env.engine.run_one(a)
    alone_b = env.engine.run_one(b)
    kept_a, kept_b = (r["index"].tolist() for r in read_log(env))
    assert kept_a != kept_b, "the two instructions should select different tokens on this model"
    batch = env.engine.run([a, b, a])
    assert len(read_log(env)) == 0  # both were cached: no probe ran again
    for got, want, what in zip(batch, (alone_a, alone_b, alone_a), "aba"):
        assert_same_output(got, want, atol=1e-5, what=f"instruction {what}")


def test_ratio0_equals_no_policy(env):
    """Ratio 0 with a probe method (instruction or none) is the stock path: the probe never runs and
    the output is the no-policy output (which the other modules prove equal to stock vLLM)."""
    specs = [make_spec(env, images=env.images, policy=p) for p in (
        None,
        probe_policy("transprune", 0.0),
        probe_policy("explain", 0.0, instruction=None),
        probe_policy("aim", 0.0, instruction=None),
    )]
    outs = env.engine.run(specs)
    for s, out in zip(specs[1:], outs[1:]):
        assert_same_output(out, outs[0], atol=1e-6, what=str(s["vlmprune"]))
    assert read_log(env) == []


def test_engine_default_method_applies_with_its_options(env):
    """A request giving only a ratio (+ instruction) gets the default's method and options (AIM with
    merge_keep 0.5, 3 PageRank iterations); one naming fastervlm runs fastervlm."""
    from vlmprune.reduction.plan import plan_image

    image = fresh_image(env, 11)
    s = make_spec(env, images=(image,), policy={"ratio": 0.75, "instruction": QUESTION})
    out = env.engine.run_one(s)
    assert out["prompt_token_ids"].count(env.image_id) == count(env, image, 0.75)
    (record,) = read_log(env)
    assert record["method"] == "aim"
    n, fixed = parts(env, image)
    policy = parse_policy({**DEFAULT, "ratio": 0.75})
    assert record["rows"].shape[0] == plan_image(policy, env.family, n, 4, route="reference").entering + fixed  # merge_keep 0.5
    out = env.engine.run_one(make_spec(env, policy={"method": "fastervlm", "ratio": 0.75}))
    assert out["prompt_token_ids"].count(env.image_id) == count(env, env.images[0], 0.75)
    assert read_log(env) == []


def _reference_kept_sets(env, s: dict, policy) -> tuple[list[tuple[int, list[int]]], object]:
    """The reference backend's kept image tokens per stage (layer, indices) and its prefill."""
    from vlmprune.reduction.reduce import reduce_image, signals_needed
    from vlmprune.reduction.stages import stage_plan

    ref = env.ref
    layers = len(ref.adapter.text_model.layers)
    pre = ref.prefill([hf_request(s)], policy)[0]
    inputs = ref.process([hf_request(s)])
    images = ref.adapter.encode_images(inputs, signals_needed(policy.method, env.family))
    seq = ref.adapter.build_sequence(inputs, 0, images)
    iattn = ref._instruction_attention(seq) if policy.method in ("transprune", "explain") else None
    red = reduce_image(
        policy, env.family, images[0], num_layers=layers,
        instruction_attention=None if iattn is None else iattn[seq.image_spans[0]],
        explain_model=env.cnn,
    )
    span = pre.sequence.image_spans[0]  # rows of the input-pruned sequence holding the image
    assert span.numel() == red.count
    plan = stage_plan(policy, images[0].n_prunable, layers) if policy.method in ("transprune", "aim") else []
    prunable = images[0].prunable.bool()
    index = red.index[prunable[red.index]]  # kept image tokens at the input, newlines aside
    sets = [(0, index.tolist())]
    state = pre.decoder._state
    if state is not None:
        for (layer, _), kept in zip(plan[1:], state.decisions):
            rows = kept[torch.isin(kept, span)]
            tokens = red.index[torch.searchsorted(span, rows)]
            sets.append((layer, tokens[prunable[tokens]].tolist()))
    return sets, pre


@pytest.mark.parametrize("method", ["transprune", "aim", "explain"])
def test_gap_to_the_reference_in_llm_semantics(env, timings, method):
    """Measured, not a claim of equality: at ratio 0.75 the vLLM probe keeps kept_count(n, 0.75)
    tokens at the LLM input; the reference backend keeps its schedule's counts stage by stage
    (explain: the same count, scored on the whole prompt instead of [image, instruction]).
    Reports the overlap of the kept sets and the first-token log-prob difference (see timings)."""
    image = fresh_image(env, 12)
    s = make_spec(env, images=(image,), policy=probe_policy(method, 0.75))
    out = env.engine.run_one(s)
    (record,) = read_log(env)
    views = parts(env, image)[0]
    n = sum(views)
    mine = set(record["index"][record["prunable"][record["kept"]]].tolist())  # kept image tokens, newlines aside
    assert len(mine) == image_kept_count(views, 0.75)
    given = {"method": method, "ratio": 0.75}
    if method == "explain":  # the reference finds no CNN beside its in-memory model: name the file
        given["checkpoint"] = str(env.model_dir / EXPLAIN_CHECKPOINT)
    policy = parse_policy({**DEFAULT, **given} if method == "aim" else given)  # aim: the default's options apply
    sets, pre = _reference_kept_sets(env, s, policy)
    key = f"{env.family}_{method}"
    for layer, kept in sets:
        if kept:  # AIM's last stages may keep no image token at all
            shared = len(mine & set(kept))
            timings[f"{key}_overlap_after_layer{layer}_{len(kept)}kept"] = shared / min(len(mine), len(kept))
    ref_logp = torch.log_softmax(pre.logits.float(), dim=-1)
    top = out["logprobs"][0]
    diff = max(abs(float(ref_logp[int(t)]) - lp) for t, lp in top.items())
    timings[f"{key}_first_token_max_abs_logprob_diff"] = diff
    timings[f"{key}_same_greedy_token"] = float(int(ref_logp.argmax()) == out["token_ids"][0])
    assert len(sets[0][1]) >= len(mine) and all(len(k) <= n for _, k in sets)
