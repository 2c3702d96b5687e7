"""Attention signals recomputed from q/k: hand examples and agreement with real transformers layers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer, Qwen2VLRotaryEmbedding

from vlmprune.signals import (
    attention_logits,
    attention_rows,
    cls_attention_from_qk,
    decoder_layer_qk,
    instruction_attention,
    mean_attention_received,
)


def _hand_qk() -> tuple[torch.Tensor, torch.Tensor]:
    # 2 heads, D = 1 (scale 1), T = 3 tokens; q of [CLS] = (1, 1) in both heads.
    # head 0 keys (0, ln2, 0) -> exp (1, 2, 1) -> softmax (.25, .5, .25)
    # head 1 keys (0, 0, ln3) -> exp (1, 1, 3) -> softmax (.2, .2, .6)
    q = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    k = torch.tensor([[[0.0, 0.0], [math.log(2), 0.0], [0.0, math.log(3)]]])
    return q, k


def test_cls_attention_hand_example():
    """Probabilities: softmax over all keys, drop [CLS], head mean: ((.5+.2)/2, (.25+.6)/2)."""
    q, k = _hand_qk()
    out = cls_attention_from_qk(q, k, num_heads=2)
    torch.testing.assert_close(out, torch.tensor([[0.35, 0.425]]))


def test_cls_logits_hand_example():
    """Logits mode: head mean of the scaled pre-softmax logits over patch keys: (ln2/2, ln3/2)."""
    q, k = _hand_qk()
    out = cls_attention_from_qk(q, k, num_heads=2, logits=True)
    torch.testing.assert_close(out, torch.tensor([[math.log(2) / 2, math.log(3) / 2]]))


def test_cls_attention_matches_full_attention():
    """Equals row 0, columns 1.. of the full multi-head softmax(q k^T / sqrt(D)), head mean."""
    torch.manual_seed(0)
    b, t, h, d = 2, 7, 4, 8
    q, k = torch.randn(b, t, h * d), torch.randn(b, t, h * d)
    qh, kh = q.view(b, t, h, d).transpose(1, 2), k.view(b, t, h, d).transpose(1, 2)
    full = (qh @ kh.transpose(-1, -2) / math.sqrt(d)).softmax(-1)  # (B, H, T, T)
    torch.testing.assert_close(cls_attention_from_qk(q, k, h), full[:, :, 0, 1:].mean(1))


def test_mean_attention_received_hand_example():
    """1 head, D=1: queries (1, 1, 0) over keys (0, ln2, 0); column means of the prob matrix.

    rows: (.25, .5, .25), (.25, .5, .25), (1/3, 1/3, 1/3) -> received (.8333, 1.3333, .8333) / 3.
    """
    q = torch.tensor([[1.0], [1.0], [0.0]])
    k = torch.tensor([[0.0], [math.log(2)], [0.0]])
    out = mean_attention_received(q, k, num_heads=1)
    torch.testing.assert_close(out, torch.tensor([0.8333333 / 3, 1.3333333 / 3, 0.8333333 / 3]))


@pytest.mark.parametrize("chunk", [1, 2, 512], ids=lambda c: f"chunk{c}")
def test_mean_attention_received_blocks(chunk):
    """Block-diagonal per image: each block equals its own separate computation and sums to 1."""
    torch.manual_seed(1)
    h, d = 2, 4
    q, k = torch.randn(9, h * d), torch.randn(9, h * d)
    cu = torch.tensor([0, 4, 4, 9])  # includes an empty block
    out = mean_attention_received(q, k, h, cu_seqlens=cu, chunk=chunk)
    for s, e in ((0, 4), (4, 9)):
        alone = mean_attention_received(q[s:e], k[s:e], h)
        torch.testing.assert_close(out[s:e], alone)
        torch.testing.assert_close(out[s:e].sum(), torch.tensor(1.0))


def test_mean_attention_received_rejects_bad_bounds():
    """cu_seqlens must run from 0 to T."""
    q = torch.randn(5, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mean_attention_received(q, q, 2, cu_seqlens=torch.tensor([0, 3]))


def test_attention_rows_hand_example():
    """GQA + causal: 2 query heads share 1 kv head; row at position 0 sees only key 0.

    D=1, k = (0, ln2, ln3); row at position 2, q = 1 -> (1, 2, 3)/6; row at position 0 -> (1, 0, 0).
    """
    k = torch.tensor([[0.0], [math.log(2)], [math.log(3)]])[:, :, None]  # (3, 1, 1)
    q = torch.ones(2, 2, 1)  # (t=2, H=2, D=1)
    probs = attention_rows(q, k, torch.tensor([2, 0]))
    expected = torch.tensor([[1 / 6, 2 / 6, 3 / 6], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(probs, torch.stack([expected, expected]))


def _llama_layer():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=16, max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    return layer, lambda x, L: rotary(x, torch.arange(L)[None])


def _qwen2vl_layer():
    torch.manual_seed(0)
    cfg = Qwen2VLTextConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=1, vocab_size=16, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    )
    cfg._attn_implementation = "eager"
    layer = Qwen2VLDecoderLayer(cfg, layer_idx=0).eval()
    rotary = Qwen2VLRotaryEmbedding(cfg)

    def pe(x, L):
        # M-RoPE ids: a 2x3 "image" grid at positions 2..7 of a text sequence (distinct t/h/w).
        pos = torch.arange(L).repeat(3, 1)
        pos[1, 2:8] = 2 + torch.tensor([0, 0, 0, 1, 1, 1])
        pos[2, 2:8] = 2 + torch.tensor([0, 1, 2, 0, 1, 2])
        pos[0, 2:8] = 2
        return rotary(x, pos[:, None, :])

    return layer, pe


@pytest.mark.parametrize("build", [_llama_layer, _qwen2vl_layer], ids=["llama", "qwen2_vl"])
def test_recomputed_attention_matches_real_layer(build):
    """decoder_layer_qk + attention_rows reproduce the eager layer's probabilities and output."""
    layer, pe_fn = build()
    L = 11
    hidden = torch.randn(1, L, 32)
    cos, sin = pe_fn(hidden, L)
    normed = layer.input_layernorm(hidden)
    causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        out_ref, weights_ref = layer.self_attn(normed, position_embeddings=(cos, sin), attention_mask=causal)
        q, k = decoder_layer_qk(layer, hidden[0], (cos, sin))
        probs = attention_rows(q, k, torch.arange(L))  # (H, L, L)
        torch.testing.assert_close(probs, weights_ref[0], atol=1e-5, rtol=1e-4)
        # Output path: probs @ v, heads concatenated, o_proj.
        attn = layer.self_attn
        v = attn.v_proj(normed[0]).view(L, -1, attn.head_dim).repeat_interleave(4 // 2, dim=1)  # (L, H, D)
        mixed = torch.einsum("hqk,khd->qhd", probs, v).reshape(L, -1)
        torch.testing.assert_close(attn.o_proj(mixed), out_ref[0], atol=1e-5, rtol=1e-4)
        # (L, D) position embeddings give the same q/k as (1, L, D).
        q2, k2 = decoder_layer_qk(layer, hidden[0], (cos[0], sin[0]))
        torch.testing.assert_close(q2, q)
        torch.testing.assert_close(k2, k)
        # Full logits: softmax recovers the layer's probabilities; -inf strictly above the diagonal.
        logits = attention_logits(layer, hidden[0], (cos, sin))
        torch.testing.assert_close(logits.softmax(-1), weights_ref[0], atol=1e-5, rtol=1e-4)
        assert torch.isinf(logits[:, 0, 1:]).all() and torch.isfinite(logits[:, -1]).all()
        # Instruction rows: mean over heads and rows of the layer's own rows.
        rows = torch.tensor([7, 9, 10])
        iga = instruction_attention(layer, hidden[0], (cos, sin), rows)
        torch.testing.assert_close(iga, weights_ref[0][:, rows].mean((0, 1)), atol=1e-5, rtol=1e-4)
        assert iga.shape == (L,)
        torch.testing.assert_close(iga.sum(), torch.tensor(1.0))
