"""How an in-LLM stage scores a request's rows: the instruction rows' attention (TransPrune), AIM's
PageRank and FastV's attention, from q/k that vLLM's own layer computes or, before a layer runs
(TransPrune's stage at layer 0), from its packed key projection; keys of rows prefilled by earlier
chunks come from the KV cache. Every score is reduced across tensor-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmprune.core import aim, fastv
from vlmprune.signals.attention import attention_rows
from vlmprune.vllm_plugin.inllm_plan import BatchRow
from vlmprune.vllm_plugin.tensor_parallel import attention_shards, gather_heads, mean_over_shards

def residual_stream(hidden: torch.Tensor, residual: torch.Tensor | None, sl: slice) -> torch.Tensor:
    """(n, d) the residual stream (a layer's input) of one request's current rows."""
    return hidden[sl] if residual is None else hidden[sl] + residual[sl]


def keep_key_weights(attn) -> None:
    """Keep a copy of the key rows of ``attn``'s fused q/k/v projection (and bias) as
    ``attn.vlmprune_key_proj``, taken when vLLM post-processes the loaded weights: on CPU it then packs
    them for oneDNN and drops the plain weight. A stage scores with the keys of every row but the
    queries of a few (TransPrune: the instruction rows; FastV: the last row), so it projects the keys
    alone (:func:`stage_qk`) instead of q, k and v of every row. On CPU the copy is packed the way vLLM packs
    its own linear layers (:class:`KeyProjection`): a plain ``F.linear`` is several times slower there
    than vLLM's oneDNN GEMM. Memory: the k projection of every layer (``kv heads x head dim x hidden``
    weights each; a quarter of q/k/v at half as many KV as query heads)."""
    proj = attn.qkv_proj
    method = proj.quant_method
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer) -> None:
        if layer is proj and proj.weight.ndim == 2 and proj.weight.shape[0] == attn.q_size + 2 * attn.kv_size:
            rows = slice(attn.q_size, attn.q_size + attn.kv_size)
            bias = getattr(proj, "bias", None)
            attn.vlmprune_key_proj = KeyProjection(proj.weight[rows].detach().clone(),
                                                    bias[rows].detach().clone() if bias is not None else None)
        original(layer)

    method.process_weights_after_loading = process_weights_after_loading


class KeyProjection:
    """``x -> x @ W_k.T + b_k`` with vLLM's own CPU GEMM (oneDNN, packed once) where vLLM uses it,
    ``F.linear`` elsewhere (GPU, or when vLLM's CPU dispatch is unavailable)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.linear = None
        if weight.device.type == "cpu":
            try:
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                holder = torch.nn.Module()
                holder.weight = torch.nn.Parameter(weight, requires_grad=False)
                holder.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
                dispatch_cpu_unquantized_gemm(holder, remove_weight=True)  # the packed copy only
                self.linear, self.weight, self.bias = holder.cpu_linear, holder.weight, holder.bias
            except Exception:  # an older/other vLLM: the plain GEMM
                self.linear = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            return self.linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def stage_qk(layer, h: torch.Tensor, pos: torch.Tensor, row: BatchRow,
        q_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (t, H, D) of ``q_rows`` among one request's current rows in ``layer`` (None: every row) and
    k (prefix + n, Hkv, D): the keys of its prompt rows cached by earlier prefill chunks
    (:func:`cached_keys`), then the current rows'. With ``q_rows`` and the layer's key projection
    kept (:func:`keep_key_weights`), only the keys of every row and the queries of ``q_rows`` are
    projected; otherwise q/k/v of every row (:func:`vlmprune.vllm_plugin.probe.decoder_qkv`)."""
    from vlmprune.vllm_plugin.probe import decoder_qkv

    attn = layer.self_attn
    normed = layer.input_layernorm(h)
    key_proj = getattr(attn, "vlmprune_key_proj", None)
    if q_rows is None or key_proj is None or getattr(attn, "q_norm", None) is not None:
        q, k, _ = decoder_qkv(attn, normed, pos)
        q = q if q_rows is None else q[q_rows]
    else:
        d = attn.head_dim
        k = key_proj(normed)  # (n, Hkv * D)
        qkv, _ = attn.qkv_proj(normed[q_rows])
        q = qkv[:, : attn.q_size].contiguous()
        # vLLM's rotary kernels rotate a query and a key (in place): a throwaway partner for each.
        q, _ = attn.rotary_emb(pos[..., q_rows], q, torch.zeros(q.shape[0], attn.kv_size, dtype=q.dtype))
        _, k = attn.rotary_emb(pos, k.clone(), k)
        q, k = q.view(q.shape[0], -1, d), k.view(k.shape[0], -1, d)
    if row.prefix:
        k = torch.cat([cached_keys(layer, row.table, row.prefix).to(k.dtype), k])
    return q, k


def cached_keys(layer, table: torch.Tensor, n: int) -> torch.Tensor:
    """(n, Hkv, D) the keys of a request's first ``n`` rows in ``layer``'s KV cache: rows before any
    stage, so at slots ``0..n-1`` of its block table in every layer. The CPU backend's layout
    (``cpu_attn.py``): ``[blocks, kv heads, block size, 2 * head]``, keys in the first half of each
    block's rows once viewed as ``[blocks, kv heads, 2 * block size, head]``."""
    cache = layer.self_attn.attn.kv_cache
    blocks, heads, size, width = cache.shape
    j = torch.arange(n, device=cache.device)
    view = cache.view(blocks, heads, 2 * size, width // 2)
    return view[table[j // size].long().to(cache.device), :, j % size, :]


class AttentionInputs:
    """Context manager: the rotated q (T, H * D) and k (T, Hkv * D) a decoder layer's attention module
    (vLLM's ``Attention``, called ``attn(q, k, v)`` by ``LlamaAttention`` / ``Qwen2Attention``) receives
    while the layer runs, i.e. after its input norm, q/k/v projection and RoPE."""

    def __init__(self, attn) -> None:
        self.attn = attn
        self.q = self.k = None
        self.handle = None

    def __enter__(self) -> AttentionInputs:
        def hook(_module, args, kwargs):
            self.q = args[0] if args else kwargs["query"]
            self.k = args[1] if len(args) > 1 else kwargs["key"]

        self.handle = self.attn.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def rows(self, sl: slice, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q (n, H, D) and k (n, Hkv, D) of rows ``sl``."""
        q, k = self.q[sl], self.k[sl]
        return q.reshape(q.shape[0], -1, head_dim), k.reshape(k.shape[0], -1, head_dim)


def layer_scores(layer, q: torch.Tensor, k: torch.Tensor, row: BatchRow) -> torch.Tensor:
    """(n,) AIM's PageRank importance or FastV's attention received, from the q (n, H, D) and k (n, Hkv, D)
    of one request's current rows in ``layer`` (:class:`AttentionInputs`); as :func:`stage_scores`."""
    if row.prefix:
        k = torch.cat([cached_keys(layer, row.table, row.prefix).to(k.dtype), k])
    if row.plan.policy.method == "aim":
        return _scores_from_qk(layer, q, k, row)
    rows = fastv.query_rows(row.plan.policy.query, q.shape[0], row.instruction).to(q.device)
    return _scores_from_qk(layer, q[rows], k, row, rows)


def stage_scores(layer, h: torch.Tensor, pos: torch.Tensor, row: BatchRow) -> torch.Tensor:
    """(n,) AIM's PageRank importance or FastV's attention received from its query rows, projecting
    the layer's q/k from its input ``h`` (:func:`stage_qk`)."""
    if row.plan.policy.method == "aim":  # PageRank of the full causal logits (H, n, prefix + n)
        return _scores_from_qk(layer, *stage_qk(layer, h, pos, row), row)
    rows = fastv.query_rows(row.plan.policy.query, h.shape[0], row.instruction).to(h.device)
    return _scores_from_qk(layer, *stage_qk(layer, h, pos, row, rows), row, rows)


def _scores_from_qk(layer, q: torch.Tensor, k: torch.Tensor, row: BatchRow,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) the score of each current row: AIM's PageRank of the causal logits of every row's q
    (``rows`` None), FastV's attention received from the query ``rows`` (q holds those rows only);
    ``k`` (prefix + n, Hkv, D) holds the cached prefix's keys first."""
    policy = row.plan.policy
    if policy.method == "aim":
        from vlmprune.vllm_plugin.probe import causal_logits

        logits = gather_heads(causal_logits(q, k), attention_shards(layer.self_attn), dim=0)  # every head, in order
        return aim.pagerank_importance(
            logits, temperature=policy.pagerank_temperature, iterations=policy.pagerank_iterations
        )
    probs = attention_rows(q, k, rows + row.prefix)  # (H, t, prefix + n)
    return mean_over_shards(fastv.attention_scores(probs[..., row.prefix :]), attention_shards(layer.self_attn))  # (n,)


def instruction_attention_scores(layer, h: torch.Tensor, pos: torch.Tensor, row: BatchRow) -> torch.Tensor:
    """(n,) the instruction rows' attention over every row of one request, mean over heads and rows
    (:func:`vlmprune.signals.attention.instruction_attention` on vLLM's fused q/k projection)."""
    q, k = stage_qk(layer, h, pos, row, row.instruction)
    probs = attention_rows(q, k, row.instruction + row.prefix)  # (H, t, prefix + n)
    return mean_over_shards(probs[..., row.prefix :].mean(dim=(0, 1)), attention_shards(layer.self_attn))
