"""Progressive in-LLM pruning (TransPrune, AIM, FastV) with real token removal and a consistent KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2VLTextConfig, Qwen2VLTextModel

from vlmprune.backends.hf.base import Sequence
from vlmprune.backends.hf.progressive import (
    forward_with_decisions,
    progressive_prefill,
    transprune_window,
)
from vlmprune.core import aim, transprune
from vlmprune.policy import AIMPolicy, FastVPolicy, TransPrunePolicy
from vlmprune.signals.attention import attention_logits, instruction_attention

VOCAB = 97
# Prompt layout: text, image (4x4 grid), text, image (3x4 grid), instruction text.
LAYOUT = [("text", 5), ("image", (4, 4)), ("text", 3), ("image", (3, 4)), ("text", 6)]
N_IMAGE = [16, 12]


def _llama(layers: int = 4, attn: str = "sdpa") -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config._attn_implementation = attn
    return LlamaModel(config).eval()


def _qwen(layers: int = 4, attn: str = "sdpa") -> Qwen2VLTextModel:
    torch.manual_seed(0)
    config = Qwen2VLTextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    config._attn_implementation = attn
    return Qwen2VLTextModel(config).eval()


BUILDERS = {"llama": _llama, "qwen2vl": _qwen}


def _sequence(model, mrope: bool, seed: int = 1) -> tuple[Sequence, list[torch.Tensor]]:
    """A prompt with two images; M-RoPE ids as Qwen2-VL lays them out (t, h, w), else 0..L-1."""
    g = torch.Generator().manual_seed(seed)
    spans, pos, cursor, start = [], [], 0, 0
    for kind, size in LAYOUT:
        if kind == "text":
            ids = torch.arange(size) + start
            pos.append(ids.unsqueeze(0).expand(3, size))
            width = size
            start += size
        else:
            rows, cols = size
            r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
            pos.append(torch.stack([torch.full((rows * cols,), start), start + r.flatten(), start + c.flatten()]))
            spans.append(torch.arange(cursor, cursor + rows * cols))
            width = rows * cols
            start += max(rows, cols)
        cursor += width
    positions = torch.cat(pos, dim=1)  # (3, L)
    if not mrope:
        positions = torch.arange(cursor)
    ids = torch.randint(0, VOCAB, (cursor,), generator=g)
    with torch.no_grad():
        embeds = model.embed_tokens(ids)
    instruction = torch.arange(cursor - LAYOUT[-1][1], cursor)
    seq = Sequence(embeds=embeds, positions=positions, input_ids=ids, image_spans=spans, instruction_index=instruction)
    return seq, spans


def _stock(model, seq: Sequence) -> torch.Tensor:
    pos = seq.positions[None] if seq.positions.ndim == 1 else seq.positions[:, None]
    return model(inputs_embeds=seq.embeds[None], position_ids=pos).last_hidden_state[0]


def _policy(method: str):
    return {"transprune": TransPrunePolicy, "aim": AIMPolicy, "fastv": FastVPolicy}[method]()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2vl"])
@pytest.mark.parametrize("method", ["transprune", "aim", "fastv"])
@torch.no_grad()
def test_no_stages_equals_the_stock_model(method, family, attn):
    """Without stages the layer-by-layer prefill reproduces the stock text model."""
    model = BUILDERS[family](attn=attn)
    seq, spans = _sequence(model, mrope=family == "qwen2vl")
    state = progressive_prefill(model, seq, spans, [], _policy(method), reindex=False)
    torch.testing.assert_close(state.hidden, _stock(model, seq), atol=1e-5, rtol=1e-5)
    assert state.decisions == []
    assert state.kept_per_layer == [sum(N_IMAGE)] * 4
    assert state.cache_lengths() == [seq.length] * 4


@pytest.mark.parametrize(
    "stages, per_layer",
    [
        ([(1, [12, 9]), (3, [2, 1])], [28, 21, 21, 3, 3, 3]),
        ([(2, [16, 0])], [28, 28, 16, 16, 16, 16]),
        ([(1, [8, 12]), (2, [8, 6]), (5, [1, 1])], [28, 20, 14, 14, 14, 2]),
        ([(0, [10, 10]), (4, [0, 0])], [20, 20, 20, 20, 0, 0]),
    ],
    ids=["two-stages", "one-image-emptied", "three-stages", "at-input-then-all"],
)
@pytest.mark.parametrize("method", ["transprune", "aim", "fastv"])
@torch.no_grad()
def test_kept_counts_per_layer_and_cache_lengths(method, stages, per_layer):
    """Every layer sees exactly the scheduled visual tokens; its KV cache holds only those + text."""
    model = _llama(layers=6)
    seq, spans = _sequence(model, mrope=False)
    state = progressive_prefill(model, seq, spans, stages, _policy(method), reindex=True)
    n_text = seq.length - sum(N_IMAGE)
    assert state.kept_per_layer == per_layer
    assert state.cache_lengths() == [n_text + k for k in per_layer]
    assert state.hidden.shape == (n_text + per_layer[-1], 64)
    text = torch.ones(seq.length, dtype=torch.bool)
    text[torch.cat(spans)] = False
    previous = torch.arange(seq.length)
    for (_, counts), kept in zip(stages, state.decisions):
        assert torch.equal(kept, kept.sort().values)
        assert bool(torch.isin(kept, previous).all()), "a stage revived a pruned token"
        assert bool(torch.isin(text.nonzero().squeeze(1), kept).all()), "a text token was pruned"
        assert [int(torch.isin(s, kept).sum()) for s in spans] == counts
        previous = kept
    assert torch.equal(state.kept_index, state.decisions[-1])


@pytest.mark.parametrize("family", ["llama", "qwen2vl"])
@pytest.mark.parametrize(
    "method, reindex",
    [("transprune", True), ("transprune", False), ("aim", False), ("fastv", False)],
    ids=["tp-reindex", "tp-orig", "aim", "fastv"],
)
@torch.no_grad()
def test_cached_decoding_equals_recomputation(family, method, reindex):
    """Greedy decoding with prefill + extend matches recomputing the pruned forward from scratch."""
    model = BUILDERS[family]()
    torch.manual_seed(3)
    lm_head = torch.nn.Linear(64, VOCAB, bias=False)
    seq, spans = _sequence(model, mrope=family == "qwen2vl")
    stages = [(1, [10, 8]), (3, [3, 2])]
    state = progressive_prefill(model, seq, spans, stages, _policy(method), reindex=reindex)
    reference = forward_with_decisions(model, seq, state.decisions, [1, 3], reindex=reindex)
    torch.testing.assert_close(state.hidden, reference, atol=1e-5, rtol=1e-5)

    last, generated = state.hidden[-1], []
    for _ in range(6):
        token = int(lm_head(last).argmax())
        generated.append(token)
        new = model.embed_tokens(torch.tensor(generated))  # (g, d)
        full = _appended(seq, new)
        ref_last = forward_with_decisions(
            model, full, state.decisions, [1, 3], reindex=reindex, prompt_length=seq.length
        )[-1]
        last = state.extend(new[-1:])[-1]
        torch.testing.assert_close(lm_head(last), lm_head(ref_last), atol=1e-4, rtol=1e-4)
        assert int(lm_head(last).argmax()) == int(lm_head(ref_last).argmax())
    n_text = seq.length - sum(N_IMAGE)
    assert state.cache_lengths() == [n_text + 28 + 6, n_text + 18 + 6, n_text + 18 + 6, n_text + 5 + 6]


def _appended(seq: Sequence, new: torch.Tensor) -> Sequence:
    """The prompt plus decoded tokens, positioned one past the largest id on every axis."""
    g = new.shape[0]
    nxt = torch.arange(int(seq.positions.max()) + 1, int(seq.positions.max()) + 1 + g)
    nxt = nxt if seq.positions.ndim == 1 else nxt.unsqueeze(0).expand(3, g)
    return Sequence(
        embeds=torch.cat([seq.embeds, new]),
        positions=torch.cat([seq.positions, nxt], dim=-1),
        input_ids=torch.cat([seq.input_ids, torch.zeros(g, dtype=torch.long)]),
        image_spans=seq.image_spans,
        instruction_index=seq.instruction_index,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2vl"])
@torch.no_grad()
def test_extend_many_equals_extend_one_at_a_time(family, attn):
    """Appending m tokens at once (explicit causal mask) equals m single-token extends."""
    model = BUILDERS[family](attn=attn)
    seq, spans = _sequence(model, mrope=family == "qwen2vl")
    stages = [(2, [6, 6])]
    torch.manual_seed(5)
    new = torch.randn(4, 64)
    at_once = progressive_prefill(model, seq, spans, stages, TransPrunePolicy(), reindex=True)
    one_by_one = progressive_prefill(model, seq, spans, stages, TransPrunePolicy(), reindex=True)
    many = at_once.extend(new)
    single = torch.cat([one_by_one.extend(new[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(many, single, atol=1e-5, rtol=1e-5)
    assert at_once.cache_lengths() == one_by_one.cache_lengths()


@torch.no_grad()
def test_transprune_choice_matches_ttv_and_iga_from_the_stock_model():
    """The stage keeps top-k of normalised TTV (hook-free recomputation) + IGA of the next layer."""
    model = _llama()
    seq, spans = _sequence(model, mrope=False)
    state = progressive_prefill(model, seq, spans, [(2, [5, 4])], TransPrunePolicy(), reindex=True)
    assert transprune_window([2], 4) == (1, 1)
    states = model(inputs_embeds=seq.embeds[None], output_hidden_states=True).hidden_states
    h1, h2 = states[1], states[2]  # inputs of layers 1 and 2, (1, L, d)
    rope = model.rotary_emb(h1, torch.arange(seq.length)[None])
    layer = model.layers[1]
    attn_in = layer.input_layernorm(h1)
    attn_out = layer.self_attn(attn_in, position_embeddings=rope, attention_mask=None)[0]
    mlp_in = layer.post_attention_layernorm(h1 + attn_out)
    ttv = transprune.transition_variation(attn_in[0], attn_out[0]) + transprune.transition_variation(
        mlp_in[0], layer.mlp(mlp_in)[0]
    )
    iga = instruction_attention(model.layers[2], h2[0], rope, seq.instruction_index)
    for span, count in zip(spans, [5, 4]):
        expected = span[transprune.reduce(transprune.combine(ttv[span], iga[span]), count)]
        assert torch.equal(expected, span[torch.isin(span, state.decisions[0])])


@torch.no_grad()
def test_aim_choice_is_pagerank_of_the_stage_layer_input():
    """AIM keeps each image's top-k PageRank importance from the logits of the layer before the stage."""
    model = _qwen()
    seq, spans = _sequence(model, mrope=True)
    state = progressive_prefill(model, seq, spans, [(2, [3, 7])], AIMPolicy(), reindex=False)
    h1 = model(inputs_embeds=seq.embeds[None], position_ids=seq.positions[:, None], output_hidden_states=True)
    h1 = h1.hidden_states[1]  # input of layer 1 (0-based), the second layer
    rope = model.rotary_emb(h1, seq.positions[:, None])
    importance = aim.pagerank_importance(attention_logits(model.layers[1], h1[0], rope))
    for span, count in zip(spans, [3, 7]):
        expected = span[aim.prune(importance[span], count)]
        assert torch.equal(expected, span[torch.isin(span, state.decisions[0])])


def _eager_attentions(model, seq: Sequence) -> tuple[torch.Tensor, ...]:
    """Per layer, (H, L, L) attention probabilities of the stock model run with eager attention."""
    pos = seq.positions[None] if seq.positions.ndim == 1 else seq.positions[:, None]
    out = model(inputs_embeds=seq.embeds[None], position_ids=pos, output_attentions=True)
    return tuple(a[0] for a in out.attentions)


@pytest.mark.parametrize("query", ["last", "instruction"])
@pytest.mark.parametrize("family", ["llama", "qwen2vl"])
@pytest.mark.parametrize("k", [1, 2, 3])
@torch.no_grad()
def test_fastv_choice_is_the_query_attention_of_layer_k_minus_1(k, family, query):
    """FastV keeps each image's top-k of the attention its query rows (the last prompt token, or the
    instruction rows) pay in layer K-1, as transformers' eager attention computes it from scratch."""
    model = BUILDERS[family](attn="eager")
    seq, spans = _sequence(model, mrope=family == "qwen2vl")
    counts = [5, 4]
    state = progressive_prefill(model, seq, spans, [(k, counts)], FastVPolicy(query=query), reindex=False)
    probs = _eager_attentions(model, seq)[k - 1]  # (H, L, L): layer K-1 over the full prompt
    rows = [seq.length - 1] if query == "last" else seq.instruction_index.tolist()
    scores = probs[:, rows].mean(dim=(0, 1))  # (L,)
    for span, count in zip(spans, counts):
        expected = span[scores[span].argsort(descending=True, stable=True)[:count]].sort().values
        assert torch.equal(expected, span[torch.isin(span, state.decisions[0])])
    assert state.kept_per_layer == [28] * k + [9] * (4 - k)
    n_text = seq.length - sum(N_IMAGE)
    assert state.cache_lengths() == [seq.length] * k + [n_text + 9] * (4 - k)


@torch.no_grad()
def test_fastv_keeps_original_positions_and_decodes_as_the_recomputation():
    """FastV on M-RoPE: kept tokens keep their ids; 8 cached decode steps equal a cache-free rerun."""
    model = _qwen()
    torch.manual_seed(4)
    lm_head = torch.nn.Linear(64, VOCAB, bias=False)
    seq, spans = _sequence(model, mrope=True)
    state = progressive_prefill(model, seq, spans, [(2, [3, 0])], FastVPolicy(), reindex=False)
    assert state.next_positions == [int(seq.positions.max()) + 1] * 4
    reference = forward_with_decisions(model, seq, state.decisions, [2], reindex=False)
    torch.testing.assert_close(state.hidden, reference, atol=1e-5, rtol=1e-5)
    last, generated = state.hidden[-1], []
    for _ in range(8):
        generated.append(int(lm_head(last).argmax()))
        new = model.embed_tokens(torch.tensor(generated))
        ref = forward_with_decisions(model, _appended(seq, new), state.decisions, [2], reindex=False,
                                     prompt_length=seq.length)[-1]
        last = state.extend(new[-1:])[-1]
        torch.testing.assert_close(lm_head(last), lm_head(ref), atol=1e-4, rtol=1e-4)


def test_fastv_scores_differ_by_query():
    """The last-token and instruction-rows variants are different signals (not the same rows)."""
    model = _llama()
    seq, spans = _sequence(model, mrope=False)
    picks = {
        q: progressive_prefill(model, seq, spans, [(1, [4, 3])], FastVPolicy(query=q), reindex=False).decisions[0]
        for q in ("last", "instruction")
    }
    assert not torch.equal(picks["last"], picks["instruction"])


@pytest.mark.parametrize(
    "stages, message",
    [
        ([(2, [10, 10]), (1, [5, 5])], "after_layer"),
        ([(4, [10, 10])], "after_layer"),
        ([(1, [10, 10]), (2, [11, 5])], "non-increasing"),
        ([(1, [17, 10])], "non-increasing"),
        ([(1, [10])], "counts for 2 images"),
    ],
)
def test_bad_stages_are_value_errors(stages, message):
    """Out-of-range layers, growing counts and a wrong number of images are rejected by name."""
    model = _llama()
    seq, spans = _sequence(model, mrope=False)
    with pytest.raises(ValueError, match=message):
        progressive_prefill(model, seq, spans, stages, TransPrunePolicy(), reindex=True)


def test_non_progressive_policy_is_rejected():
    model = _llama()
    seq, spans = _sequence(model, mrope=False)
    with pytest.raises(ValueError, match="policy.method"):
        progressive_prefill(model, seq, spans, [], object(), reindex=True)


@torch.no_grad()
def test_a_stage_that_keeps_everything_still_reindexes():
    """With reindex, a no-op stage re-indexes M-RoPE ids too, exactly as the cache-free forward."""
    model = _qwen()
    seq, spans = _sequence(model, mrope=True)
    stages = [(1, [16, 12]), (2, [4, 4])]
    state = progressive_prefill(model, seq, spans, stages, TransPrunePolicy(), reindex=True)
    assert state.kept_per_layer == [28, 28, 8, 8]
    reference = forward_with_decisions(model, seq, state.decisions, [1, 2], reindex=True)
    torch.testing.assert_close(state.hidden, reference, atol=1e-5, rtol=1e-5)
    plain = forward_with_decisions(model, seq, [], [], reindex=True)
    assert not torch.allclose(forward_with_decisions(model, seq, state.decisions[:1], [1], reindex=True), plain)
