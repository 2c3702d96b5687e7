"""The transformers reference backend end to end on tiny LLaVA-1.5 / LLaVA-NeXT models."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.testbed.tiny import make_image
from vlmprune.backends.hf import ReferenceBackend, Request
from vlmprune.reduction.image_tokens import CLS_ATTENTION
from vlmprune.core import fastervlm, schedule
from vlmprune.core.explain import RelevanceCNN, RelevanceCNNConfig
from vlmprune.methods import METHODS
from vlmprune.policy import PolicyError, image_kept_count, kept_count, parse_policy

FAMILIES = ("llava", "llava_next")
REQUEST = Request("what colour is the box ?", [make_image(96, 64, 0)])
OTHER = Request("where is the big red square ?", [make_image(50, 90, 1)])
WORDS = ["yes", "no", "red", "green", "blue", "box", "left", "right", "two", "three"]


@pytest.fixture(scope="module")
def cnn_path(tmp_path_factory):
    """A seeded (untrained) relevance CNN, saved the way shipped weights are."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("explain") / "cnn.pt"
    RelevanceCNN(RelevanceCNNConfig(channels=(8, 16))).save(path)
    return str(path)


@pytest.fixture(scope="module", params=FAMILIES)
def backend(request):
    model, processor = request.getfixturevalue(request.param)
    return ReferenceBackend(model, processor)


def _policy(method: str, ratio: float, cnn_path: str):
    extra = {"checkpoint": cnn_path} if method == "explain" else {}
    return parse_policy({"method": method, "ratio": ratio, **extra})


def _methods(family: str) -> list[str]:
    return [name for name, spec in METHODS.items() if family in spec.models]


def _expected_input_keep(policy, view_sizes: tuple[int, ...], num_layers: int) -> int:
    n_prunable = sum(view_sizes)
    if policy.method == "transprune":
        stages = schedule.transprune_stages(num_layers)
    elif policy.method == "aim":
        stages = schedule.aim_stages(num_layers, policy.merge_keep)
    elif policy.method == "fastv":
        return n_prunable  # FastV never prunes before layer K
    else:
        return sum(kept_count(n, policy.ratio) for n in view_sizes)  # every view by itself
    scaled = schedule.scale_to_ratio(stages, num_layers, policy.ratio)
    return dict(schedule.stage_counts(scaled, n_prunable)).get(0, n_prunable)


def _stock_inputs(backend, request):
    return backend.process([request])


CASES = [(f, m) for f in FAMILIES for m in _methods(f)]


@pytest.mark.parametrize("ratio", [0.5, 0.9])
@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_kept_count_at_llm_input(request, family, method, ratio, cnn_path):
    """Exactly kept_count (or the scaled schedule's stage-0 count) prunable tokens reach the LLM;
    the pruned sequence is text + newlines + kept, and text is untouched."""
    backend = ReferenceBackend(*request.getfixturevalue(family))
    policy = _policy(method, ratio, cnn_path)
    full = backend.prefill([REQUEST], parse_policy({"method": "random", "ratio": 0.0}))[0]
    pre = backend.prefill([REQUEST], policy)[0]
    n_prunable = full.visual_tokens
    ((_, (image,)),) = backend.sequences([REQUEST])
    assert sum(image.view_sizes) == n_prunable
    expected = _expected_input_keep(policy, image.view_sizes, len(backend.adapter.text_model.layers))
    assert pre.visual_tokens == n_prunable
    assert pre.kept_tokens == expected
    if method in ("transprune", "aim", "fastv"):  # progressive: fewer tokens somewhere, maybe only inside the LLM
        assert pre.kept_per_layer[0] == pre.kept_tokens
        assert pre.kept_per_layer == sorted(pre.kept_per_layer, reverse=True)
        assert pre.kept_per_layer[-1] < n_prunable
    else:
        assert pre.kept_tokens < n_prunable
    text_len = full.sequence.length - n_prunable - full.fixed_tokens
    assert pre.sequence.length == text_len + pre.fixed_tokens + pre.kept_tokens
    assert pre.fixed_tokens == (0 if family == "llava" else full.fixed_tokens)
    image_id = backend.model.config.image_token_id
    is_text = full.sequence.input_ids != image_id
    assert torch.equal(pre.sequence.input_ids[pre.sequence.input_ids != image_id], full.sequence.input_ids[is_text])
    assert torch.equal(pre.sequence.positions, torch.arange(pre.sequence.length))  # LLaVA re-indexes
    assert math.isfinite(float(pre.logits.float().abs().max()))


@pytest.mark.parametrize(("family", "method"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_ratio_zero_is_the_stock_model(request, family, method, cnn_path):
    """Ratio 0 reproduces the stock forward: bitwise against logits_to_keep=1 (the same lm_head
    matmul shape); within 1e-6 of the full-sequence logits (a (1, L, d) lm_head matmul can round the
    last row differently from a (1, 1, d) one)."""
    model, processor = request.getfixturevalue(family)
    backend = ReferenceBackend(model, processor)
    logits = backend.logits([REQUEST], _policy(method, 0.0, cnn_path))[0]
    inputs = _stock_inputs(backend, REQUEST)
    with torch.no_grad():
        last = model(**inputs, logits_to_keep=1).logits[0, -1]
        full = model(**inputs).logits[0, -1]
    assert torch.equal(logits, last)
    torch.testing.assert_close(logits, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "policy",
    [{"method": "fastervlm", "ratio": 0.5}, {"method": "transprune", "ratio": 0.9}, {"method": "aim", "ratio": 0.5}],
    ids=["fastervlm", "transprune", "aim"],
)
def test_batch_equals_single_requests(backend, policy):
    """Two requests with different images in one call give what two single calls give."""
    both = backend.prefill([REQUEST, OTHER], policy)
    for pre, req in zip(both, [REQUEST, OTHER]):
        alone = backend.prefill([req], policy)[0]
        assert (pre.visual_tokens, pre.kept_tokens, pre.fixed_tokens) == (
            alone.visual_tokens,
            alone.kept_tokens,
            alone.fixed_tokens,
        )
        assert torch.equal(pre.sequence.input_ids, alone.sequence.input_ids)
        torch.testing.assert_close(pre.logits, alone.logits, atol=1e-5, rtol=1e-5)
    assert both[0].visual_tokens != both[1].visual_tokens or backend.family == "llava"


def test_fastervlm_keeps_the_top_cls_attention_features(llava):
    """LLaVA FasterVLM: the kept visual embeddings are the image features at the top-k [CLS] rows."""
    backend = ReferenceBackend(*llava)
    inputs = backend.process([REQUEST])
    with torch.no_grad():
        image = backend.adapter.encode_images(inputs, frozenset({CLS_ATTENTION}))[0]
    keep = kept_count(image.n_prunable, 0.75)
    index = fastervlm.reduce(image.signals[CLS_ATTENTION], image.prunable, keep).index
    pre = backend.prefill([REQUEST], {"method": "fastervlm", "ratio": 0.75})[0]
    span = pre.sequence.image_spans[0]
    assert span.numel() == keep
    assert torch.equal(pre.sequence.embeds[span], image.features[index])


def test_unsupported_pair_raises_naming_both(llava):
    """globalcom2 needs AnyRes crops: on LLaVA-1.5 it is a PolicyError naming method and family."""
    backend = ReferenceBackend(*llava)
    with pytest.raises(PolicyError, match="globalcom2.*llava"):
        backend.prefill([REQUEST], {"method": "globalcom2", "ratio": 0.5})


def test_explain_without_weights_is_a_clear_error(llava):
    """No checkpoint given and none shipped beside the model: PolicyError naming the field."""
    backend = ReferenceBackend(*llava)
    with pytest.raises(PolicyError, match="checkpoint"):
        backend.prefill([REQUEST], {"method": "explain", "ratio": 0.5})
    with pytest.raises(PolicyError, match="no such file"):
        backend.prefill([REQUEST], {"method": "explain", "ratio": 0.5, "checkpoint": "/nonexistent/cnn.pt"})


def test_generate_greedy(backend):
    """Greedy tokens and counts; at ratio 0 identical to the stock model's greedy generate."""
    gens = backend.generate([REQUEST, OTHER], {"method": "fastervlm", "ratio": 0.0}, max_new_tokens=4)
    inputs = _stock_inputs(backend, REQUEST)
    with torch.no_grad():
        stock = backend.model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert gens[0].token_ids == stock[0, inputs["input_ids"].shape[1] :].tolist()
    pruned = backend.generate([REQUEST], {"method": "aim", "ratio": 0.9}, max_new_tokens=3)[0]
    assert 1 <= len(pruned.token_ids) <= 3
    assert pruned.kept_tokens < pruned.visual_tokens
    assert pruned.prompt_tokens < gens[0].prompt_tokens
    assert isinstance(pruned.text, str)


def test_decoding_after_pruning_matches_a_cache_free_forward(llava):
    """Decoding through the cache of a pruned prefill equals running the pruned sequence + the new
    tokens from scratch (positions continue after the pruned prompt)."""
    backend = ReferenceBackend(*llava)
    pre = backend.prefill([REQUEST], {"method": "fastervlm", "ratio": 0.5})[0]
    tokens = [int(pre.logits.argmax()), 7]
    stepped = pre.decoder.extend(tokens[:1])[-1]
    stepped2 = pre.decoder.extend(tokens[1:])[-1]
    model = backend.model
    with torch.no_grad():
        new = model.get_input_embeddings()(torch.tensor(tokens))
        embeds = torch.cat([pre.sequence.embeds, new])[None]
        out = backend.adapter.text_model(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None])
        ref = backend.adapter.lm_head(out.last_hidden_state)[0]
    torch.testing.assert_close(stepped, ref[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped2, ref[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", [{"method": "fastervlm", "ratio": 0.0}, {"method": "transprune", "ratio": 0.9}])
def test_score(backend, policy):
    """Finite log-probabilities; one-token candidates rank like the next-token logits and the best
    one is generate's first token; a two-token candidate is teacher-forced through the cache."""
    tokenizer = backend.tokenizer
    first = backend.generate([REQUEST], policy, max_new_tokens=1)[0].token_ids[0]
    first_word = tokenizer.convert_ids_to_tokens(first)
    candidates = WORDS + ([first_word] if first_word not in WORDS else [])
    ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    assert all(len(i) == 1 for i in ids) and ids[-1 if first_word not in WORDS else WORDS.index(first_word)] == [first]
    scores = backend.score(REQUEST, candidates, policy)
    assert len(scores) == len(candidates) and all(math.isfinite(s) and s <= 0 for s in scores)
    assert candidates[max(range(len(scores)), key=scores.__getitem__)] == first_word
    pre = backend.prefill([REQUEST], policy)[0]
    logp = torch.log_softmax(pre.logits.float(), dim=-1)
    torch.testing.assert_close(torch.tensor(scores), logp[[i[0] for i in ids]], atol=1e-5, rtol=0)

    red, green = (tokenizer.convert_tokens_to_ids(w) for w in ("red", "green"))
    two = backend.score(REQUEST, ["red green"], policy)[0]
    step = pre.decoder.extend([red])[-1]
    assert two == pytest.approx(float(logp[red]) + float(torch.log_softmax(step.float(), -1)[green]), abs=1e-5)
    if policy["ratio"] == 0.0:  # against the stock model on prompt + candidate
        inputs = _stock_inputs(backend, REQUEST)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[red, green]])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(backend.model(**inputs).logits[0, -3:-1].float(), dim=-1)
        assert two == pytest.approx(float(lp[0, red] + lp[1, green]), abs=1e-5)


def test_text_only_request_is_the_stock_model(backend):
    """A request without images passes through any policy untouched."""
    req = Request("is there a red box ?", [])
    pre = backend.prefill([req], {"method": "fastervlm", "ratio": 0.9})[0]
    assert (pre.visual_tokens, pre.kept_tokens, pre.sequence.image_spans) == (0, 0, [])
    with torch.no_grad():
        stock = backend.model(**backend.process([req]), logits_to_keep=1).logits[0, -1]
    assert torch.equal(pre.logits, stock)


def test_transprune_original_positions_on_llava(llava):
    """TransPrune with positions='original' keeps the kept tokens' original ids at the LLM input."""
    backend = ReferenceBackend(*llava)
    full = backend.prefill([REQUEST], {"method": "random", "ratio": 0.0})[0].sequence
    pre = backend.prefill([REQUEST], {"method": "transprune", "ratio": 0.9, "positions": "original"})[0]
    seq = pre.sequence
    assert seq.length < full.length
    assert bool((seq.positions[1:] > seq.positions[:-1]).all())
    assert int(seq.positions[-1]) == full.length - 1  # the text after the image keeps its ids
    assert torch.equal(full.embeds[seq.positions], seq.embeds)
    reindexed = backend.prefill([REQUEST], {"method": "transprune", "ratio": 0.9})[0]
    assert torch.equal(reindexed.sequence.embeds, seq.embeds)
    assert not torch.equal(reindexed.logits, pre.logits)


def test_several_images_in_one_request(llava_next):
    """Each image of a request is reduced on its own: kept = sum over images of the per-view
    kept_counts (LLaVA-NeXT: thumbnail and each crop budgeted by itself)."""
    backend = ReferenceBackend(*llava_next)
    req = Request("which box is red ?", [make_image(96, 64, 0), make_image(50, 90, 1)])
    with torch.no_grad():
        images = backend.adapter.encode_images(backend.process([req]), frozenset())
    pre = backend.prefill([req], {"method": "fastervlm", "ratio": 0.9})[0]
    assert pre.visual_tokens == sum(im.n_prunable for im in images)
    assert pre.kept_tokens == sum(image_kept_count(im.view_sizes, 0.9) for im in images)
    fixed = [im.n_tokens - im.n_prunable for im in images]
    assert [s.numel() for s in pre.sequence.image_spans] == [
        sum(kept_count(n, 0.9) for n in im.view_sizes) + f for im, f in zip(images, fixed)
    ]


def test_from_pretrained_round_trip(llava, tmp_path):
    """A saved hub-layout directory loads into a backend whose ratio-0 logits are the loaded stock
    model's bitwise (and the original model's up to rounding: a loaded weight's memory alignment
    can change the one-row matmul kernel's summation order)."""
    model, processor = llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = ReferenceBackend.from_pretrained(tmp_path)
    assert loaded.family == "llava"
    logits = loaded.logits([REQUEST])[0]
    with torch.no_grad():
        stock = loaded.model(**loaded.process([REQUEST]), logits_to_keep=1).logits[0, -1]
    assert torch.equal(logits, stock)
    torch.testing.assert_close(logits, ReferenceBackend(model, processor).logits([REQUEST])[0], atol=1e-6, rtol=0)


def test_unknown_model_type_is_rejected(llava):
    """A model whose family has no adapter is a ValueError naming its model type."""
    model, processor = llava
    text_only = model.model.language_model
    with pytest.raises(ValueError, match="llama"):
        ReferenceBackend(text_only, processor)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_fastv_prunes_after_layer_k_by_the_last_tokens_eager_attention(backend, ratio):
    """FastV through the reference backend: every visual token up to layer K, then the schedule's
    count; the kept tokens are the top-k of layer K-1's eager attention from the last prompt token;
    text-only rows are untouched and decoding continues from the pruned cache."""
    from vlmprune.reduction.stages import stage_plan
    from vlmprune.testbed.train_explain import eager_attention

    policy = parse_policy({"method": "fastv", "ratio": ratio})
    text_model = backend.adapter.text_model
    num_layers = len(text_model.layers)
    pre = backend.prefill([REQUEST], policy)[0]
    n = pre.visual_tokens
    (_, (k, count)) = stage_plan(policy, n, num_layers)
    assert 0 < count < n and pre.kept_tokens == n
    assert pre.kept_per_layer == [n] * k + [count] * (num_layers - k)

    ((seq, (image,)),) = backend.sequences([REQUEST])
    with torch.no_grad(), eager_attention(text_model):
        out = text_model(inputs_embeds=seq.embeds[None], position_ids=seq.positions[None], output_attentions=True)
    probs = out.attentions[k - 1][0]  # (H, L, L), layer K-1 over the unpruned prompt
    span = seq.image_spans[0][image.prunable.bool()]
    scores = probs[:, -1, span].mean(dim=0)
    expected = scores.argsort(descending=True, stable=True)[:count].sort().values
    prunable_index = image.prunable.bool().nonzero().squeeze(1)
    final = pre.final_kept_index[0]
    assert torch.equal(final[image.prunable[final].bool()], prunable_index[expected])
    assert len(backend.greedy_tokens(pre, 3)) >= 1


def test_fastv_layer_deeper_than_the_model_is_refused_at_any_ratio(llava):
    """A FastV ``layer`` the served LLM lacks is a PolicyError naming the field, ratio 0 included."""
    backend = ReferenceBackend(*llava)
    depth = len(backend.adapter.text_model.layers)
    for ratio in (0.0, 0.5):
        with pytest.raises(PolicyError, match=rf"field 'layer'.*\[1, {depth - 1}\].*got {depth}"):
            backend.prefill([REQUEST], {"method": "fastv", "ratio": ratio, "layer": depth})
