"""Attention signals recomputed from q/k, so no attention kernel ever has to return its weights.

FlashAttention and SDPA never return attention probabilities, and switching a whole model to eager
attention costs an L x L matrix per layer. The pruners only need a few rows of one layer (the ViT's
[CLS] row, a decoder layer's instruction rows), so these functions recompute exactly those rows from
the layer's q/k projections. All math is fp32 (Qwen2 q.k overflows in bf16/fp16).

Shapes: ``B`` batch, ``T`` ViT tokens ([CLS] first where present), ``L`` decoder sequence length,
``H`` query heads, ``Hkv`` key/value heads (GQA), ``D`` head dim, ``t`` query rows.
"""

from __future__ import annotations

import math

import torch


def cls_attention_from_qk(q: torch.Tensor, k: torch.Tensor, num_heads: int, *, logits: bool = False) -> torch.Tensor:
    """[CLS] -> patch attention of one ViT layer, head mean; (B, T-1).

    ``q``, ``k`` (B, T, H*D) are the layer's q/k projection outputs (unscaled), token 0 = [CLS].
    Default: softmax over all T keys ([CLS] included), then column 0 dropped (FasterVLM's
    ``attentions[:, :, 0, 1:]``). ``logits=True``: the pre-softmax scaled logits instead (GlobalCom2).
    """
    if q.ndim != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (B, T, H*D), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, hd = q.shape
    if num_heads <= 0 or hd % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the projection width {hd}")
    d = hd // num_heads
    q_cls = q[:, 0].float().view(b, num_heads, d)  # (B, H, D)
    kh = k.float().view(b, t, num_heads, d)  # (B, T, H, D)
    scores = torch.einsum("bhd,bthd->bht", q_cls, kh) / math.sqrt(d)  # (B, H, T)
    if not logits:
        scores = scores.softmax(dim=-1)
    return scores[:, :, 1:].mean(dim=1)  # (B, T-1)


def mean_attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    num_heads: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk: int = 512,
) -> torch.Tensor:
    """Softmax attention each key receives, averaged over its image's queries and heads; (T,).

    For encoders without [CLS] (Qwen's packed varlen ViT): ``q``, ``k`` (T, H*D), taken after the
    block's vision rotary embedding, as its attention uses them; attention is
    block-diagonal per image with boundaries ``cu_seqlens`` (n_images+1,) (None = one block).
    Queries are processed ``chunk`` rows at a time, so at most (H, chunk, n_block) is materialised.
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (T, H*D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    t, hd = q.shape
    if num_heads <= 0 or hd % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the projection width {hd}")
    d = hd // num_heads
    bounds = [0, t] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != t or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to {t}, got {bounds}")
    qh = q.view(t, num_heads, d)
    kh = k.view(t, num_heads, d)
    out = torch.zeros(t, dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for start, end in zip(bounds, bounds[1:]):
        n = end - start
        if n == 0:
            continue
        kb = kh[start:end].float().transpose(0, 1)  # (H, n, D)
        received = torch.zeros(num_heads, n, dtype=torch.float32, device=q.device)  # (H, n)
        for c0 in range(start, end, chunk):
            qc = qh[c0 : min(c0 + chunk, end)].float().transpose(0, 1)  # (H, c, D)
            probs = (qc @ kb.transpose(1, 2) * scale).softmax(dim=-1)  # (H, c, n)
            received += probs.sum(dim=1)
        out[start:end] = received.mean(dim=0) / n
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' RoPE convention: the two halves of the head dim are the rotated pair."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _cos_sin(position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor | None):
    """(cos, sin) as (L', 1, D) fp32, selected at ``rows`` if given (accepts (1, L, D) or (L, D))."""
    cos, sin = position_embeddings
    if cos.ndim == 3:
        if cos.shape[0] != 1:
            raise ValueError(f"position_embeddings must be for one sequence, got batch {cos.shape[0]}")
        cos, sin = cos[0], sin[0]
    if rows is not None:
        cos, sin = cos[rows], sin[rows]
    return cos.float()[:, None, :], sin.float()[:, None, :]


def _project(layer, hidden: torch.Tensor, which: str) -> torch.Tensor:
    """One of the layer's q/k projections on its input-normed hidden states, (L', heads, D) fp32."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)  # (L', d)
    proj = getattr(attn, f"{which}_proj")(normed)
    out = proj.view(hidden.shape[0], -1, attn.head_dim).float()
    norm = getattr(attn, f"{which}_norm", None)  # per-head q/k norm (Qwen3-style layers), absent in Llama/Qwen2
    if norm is not None:
        out = norm(out.to(hidden.dtype)).float()
    return out


def _decoder_qk(
    layer,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    q_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q at ``q_rows`` (all rows if None) and k at all rows, after RoPE; fp32."""
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be (L, d), got {tuple(hidden.shape)}")
    q_hidden = hidden if q_rows is None else hidden[q_rows]
    q = _project(layer, q_hidden, "q")  # (t, H, D)
    k = _project(layer, hidden, "k")  # (L, Hkv, D)
    cos_q, sin_q = _cos_sin(position_embeddings, q_rows)
    cos_k, sin_k = _cos_sin(position_embeddings, None)
    if cos_k.shape[0] != hidden.shape[0]:
        raise ValueError(f"position_embeddings cover {cos_k.shape[0]} positions, hidden has {hidden.shape[0]}")
    q = q * cos_q + _rotate_half(q) * sin_q
    k = k * cos_k + _rotate_half(k) * sin_k
    return q, k


def decoder_layer_qk(
    layer, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (L, H, D) and k (L, Hkv, D) of a decoder layer, after RoPE, as its own attention sees them.

    ``layer``: a transformers LlamaDecoderLayer / Qwen2VLDecoderLayer / Qwen2_5_VLDecoderLayer;
    ``hidden`` (L, d) is the layer's residual-stream *input* (before ``input_layernorm``);
    ``position_embeddings`` = (cos, sin) from the LM's ``rotary_emb`` for these positions (M-RoPE
    sections are already folded in by Qwen's rotary module). Projections run in the layer's dtype,
    RoPE and the result are fp32.
    """
    return _decoder_qk(layer, hidden, position_embeddings)


def _repeat_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(L, Hkv, D) -> (L, H, D): query head h reads kv head h // (H / Hkv), as transformers' repeat_kv."""
    hkv = k.shape[1]
    if num_heads % hkv:
        raise ValueError(f"{num_heads} query heads cannot share {hkv} key/value heads")
    return k.repeat_interleave(num_heads // hkv, dim=1)


def attention_rows(q_rows: torch.Tensor, k: torch.Tensor, row_positions: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention of a few query rows over all keys; (H, t, L) fp32.

    ``q_rows`` (t, H, D), ``k`` (L, Hkv, D), ``row_positions`` (t,) the sequence index of each row:
    key j is visible to a row iff ``j <= row_position``.
    """
    t, h, d = q_rows.shape
    if k.ndim != 3 or k.shape[2] != d:
        raise ValueError(f"k must be (L, Hkv, {d}), got {tuple(k.shape)}")
    if row_positions.shape != (t,):
        raise ValueError(f"row_positions must be ({t},), got {tuple(row_positions.shape)}")
    kk = _repeat_kv(k.float(), h)  # (L, H, D)
    logits = torch.einsum("thd,lhd->htl", q_rows.float(), kk) / math.sqrt(d)  # (H, t, L)
    keys = torch.arange(k.shape[0], device=k.device)
    visible = keys[None, :] <= row_positions.to(k.device)[:, None]  # (t, L)
    logits = logits.masked_fill(~visible[None], float("-inf"))
    return logits.softmax(dim=-1)


def instruction_attention(
    layer,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    instruction_index: torch.Tensor,
) -> torch.Tensor:
    """Attention from the instruction rows to every key, mean over heads and rows; (L,).

    ``instruction_index`` (t,) ascending sequence indices. Only those t query rows are computed
    (TransPrune's IGA, the explain method's layer-0 input); Qwen2's sliding window is not applied
    (it is off in every released checkpoint).
    """
    if instruction_index.ndim != 1 or instruction_index.numel() == 0:
        raise ValueError("instruction_index must be a non-empty 1-D tensor of sequence indices")
    return query_attention(layer, hidden, position_embeddings, instruction_index).mean(dim=(0, 1))


def query_attention(
    layer,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
) -> torch.Tensor:
    """Causal softmax attention of a decoder layer's query ``rows`` over every key; (H, t, L) fp32.

    ``rows`` (t,) ascending sequence indices (FastV: the last prompt token, or the instruction);
    ``hidden`` (L, d) the layer's residual-stream input. Only those t query rows are computed.
    """
    if rows.ndim != 1 or rows.numel() == 0:
        raise ValueError("rows must be a non-empty 1-D tensor of sequence indices")
    rows = rows.to(hidden.device)
    q, k = _decoder_qk(layer, hidden, position_embeddings, q_rows=rows)
    return attention_rows(q, k, rows)  # (H, t, L)


def attention_logits(
    layer, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Full causal-masked scaled logits of a decoder layer, (H, L, L) fp32 (-inf above the diagonal).

    AIM's PageRank needs the whole matrix; the reference backend only calls this on short sequences.
    """
    q, k = _decoder_qk(layer, hidden, position_embeddings)  # (L, H, D), (L, Hkv, D)
    length, h, d = q.shape
    kk = _repeat_kv(k, h)
    logits = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(d)  # (H, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal[None], float("-inf"))
