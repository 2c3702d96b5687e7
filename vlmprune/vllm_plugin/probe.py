"""The shallow probe: instruction-aware scores for TransPrune, AIM's prune stage and explain in vLLM.

Why a probe. In vLLM every decision must be taken in ``embed_multimodal``, before the LLM runs,
because the processor fixed each image's placeholder count and the paged KV cache holds whatever
enters the prompt. The in-LLM methods of the reference backend (TransPrune, AIM) read the LLM's own
hidden states between decoder layers; here the first ``K`` decoder layers of the *served* LM are run
once more, outside the paged cache, over the short sequence ``[image rows, instruction tokens]``,
and their signals pick the rows that enter the real prompt.

How the layers run (verified on vLLM 0.32, ``../shared/design/spike_vllm032_llava.py``): each
decoder layer's own submodules are called directly - ``input_layernorm``, ``self_attn.qkv_proj``
(q/k norms where present), ``self_attn.rotary_emb(positions, q, k)``, plain torch causal attention,
``self_attn.o_proj``, ``post_attention_layernorm``, ``mlp`` - never ``self_attn.attn`` (the
paged-attention op, which would write into the KV cache). One function serves all four families:
the LMs differ only in their positions, 1-D ``(L,)`` (LLaVA, LLaVA-NeXT) or M-RoPE ``(3, L)``
(Qwen2-VL, Qwen2.5-VL), and vLLM's ``rotary_emb`` takes either.

Scores (per image; only the image's prunable rows compete, text and newline rows are kept):

- ``transprune``: ``combine(TTV summed over the K probe layers, IGA)`` with IGA the instruction rows'
  attention inside the last probe layer (:func:`vlmprune.core.transprune.combine`);
- ``aim``: ToMe merging to its schedule's LLM-input count first (as before), then
  :func:`vlmprune.core.aim.pagerank_importance` over the last probe layer's full causal logits of
  the merged rows + instruction (text protected: only image rows are chosen);
- ``explain``: the :class:`~vlmprune.core.explain.RelevanceCNN` over layer 0's instruction->image
  attention (one probe layer, whatever ``probe_layers`` says).

Counts: every method keeps ``kept_count(n, ratio)`` prunable tokens, the count with the same LLM
FLOPs as the layer-averaged ``ratio`` of the progressive schedules (see
:func:`vlmprune.reduction.plan.plan_image` on the probe route).

Positions of the probe sequence: LLaVA rows get ``0..m-1`` (the re-indexed prompt vLLM runs) and
the instruction continues at ``m``; Qwen rows keep their (t, h, w) ids relative to the image start
(a merged row the id of the token it stands for) and the instruction starts at ``max + 1`` of the
full grid, Qwen's rule for the text after an image.

Known gaps to the reference backend's in-LLM semantics (measured in
``tests/vllm/test_plugin_probe.py``): the probe sees one image and the instruction, not the whole
prompt (no system text, no other images), and it prunes once at the LLM input to the FLOPs-equal
count instead of stage by stage inside the LLM.

Limits: the probe needs every attention head of the LM on one rank, so requests using these methods
fail in the worker under tensor parallelism (``--tensor-parallel-size > 1``) and pipeline
parallelism is not supported either; AIM's PageRank materialises the last probe layer's
``(H, L, L)`` fp32 logits (about 0.2 GB for 32 heads and 1 300 merged rows).

Shapes: ``n`` rows of one image, ``t`` instruction tokens, ``L = n + t``, ``d`` LM width, ``H``
query heads, ``Hkv`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.core import aim, explain, transprune
from vlmprune.core.select import TokenReduction, topk_sorted
from vlmprune.policy import PolicyError, image_kept_count
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.reduce import reduce_image
from vlmprune.signals.attention import attention_rows
from vlmprune.vllm_plugin.tensor_parallel import attention_shards, gather_heads, mean_over_shards

EXPLAIN_CHECKPOINT = explain.CHECKPOINT_NAME


# --- The probe itself ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSignals:
    """What the probe read, over all ``L`` rows of its sequence (image rows first)."""

    ttv: torch.Tensor | None = None
    """(L,) TransPrune's TTV (attention + FFN) summed over the probe layers."""
    iga: torch.Tensor | None = None
    """(L,) instruction rows' attention inside the last probe layer, mean over heads and rows."""
    logits: torch.Tensor | None = None
    """(H, L, L) fp32 causal-masked scaled logits of the last probe layer (-inf above the diagonal)."""


class ShallowProbe:
    """The first decoder layers of a vLLM LM (``LlamaModel`` / ``Qwen2Model``), run without the cache.

    Holds a reference to the served model's modules (no copy, no parameters of its own). Under
    tensor parallelism each rank runs its own heads (the layers' row-parallel projections reduce the
    hidden states); the attention signals are reduced across ranks (:mod:`.tensor_parallel`).
    """

    def __init__(self, lm: nn.Module) -> None:
        if not hasattr(lm, "layers") or not hasattr(lm, "embed_tokens"):
            raise TypeError(f"{type(lm).__name__} has no decoder layers/embed_tokens to probe")
        self.lm = lm

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    @torch.no_grad()
    def run(
        self,
        rows: torch.Tensor,
        positions: torch.Tensor,
        instruction_ids: torch.Tensor,
        layers: int,
        *,
        ttv_direction: str | None = None,
        iga: bool = False,
        logits: bool = False,
    ) -> ProbeSignals:
        """Run decoder layers ``0..layers-1`` over ``[rows, embed(instruction_ids)]``.

        ``rows`` (n, d) image rows as they would enter the LLM; ``positions`` (L,) or (3, L) for
        the whole sequence; ``instruction_ids`` (t,), t >= 1. ``ttv_direction`` (TransPrune's
        ``direction``) sums TTV over every probe layer; ``iga`` / ``logits`` read the last probe
        layer's attention. The last layer runs only as far as the requested signals need.
        """
        if not 1 <= layers <= self.num_layers:
            raise ValueError(f"layers must be in [1, {self.num_layers}], got {layers}")
        if instruction_ids.ndim != 1 or instruction_ids.numel() == 0:
            raise ValueError("instruction_ids must be a non-empty 1-D tensor")
        device = rows.device
        text = self.lm.embed_tokens(instruction_ids.to(device).long()).to(rows.dtype)  # (t, d)
        hidden = torch.cat([rows, text])  # (L, d)
        length, n = hidden.shape[0], rows.shape[0]
        positions = positions.to(device).long()
        if positions.shape[-1] != length:
            raise ValueError(f"positions cover {positions.shape[-1]} tokens, the probe sequence has {length}")
        instr_rows = torch.arange(n, length, device=device)  # (t,)
        ttv = torch.zeros(length, dtype=torch.float32, device=device) if ttv_direction else None
        out_iga = out_logits = None
        for idx in range(layers):
            layer = self.lm.layers[idx]
            last = idx == layers - 1
            attn = layer.self_attn
            shards = attention_shards(attn)
            normed = layer.input_layernorm(hidden)  # (L, d)
            q, k, v = decoder_qkv(attn, normed, positions)  # (L, H, D), (L, Hkv, D), (L, Hkv, D)
            if last and iga:
                probs = attention_rows(q[instr_rows], k, instr_rows)  # (H, t, L)
                out_iga = mean_over_shards(probs.mean(dim=(0, 1)), shards)  # (L,), every head
            if last and logits:
                out_logits = gather_heads(causal_logits(q, k), shards, dim=0)  # (H, L, L), every head
            if last and ttv is None:
                break  # nothing below the attention scores is needed
            scale = float(getattr(attn, "scaling", attn.head_dim**-0.5))  # the served attention's own scale
            mixed = _causal_attention(q, k, v, scale).reshape(length, -1)  # (L, H*D)
            attn_out, _ = attn.o_proj(mixed)  # (L, d), before the residual
            hidden = hidden + attn_out
            normed2 = layer.post_attention_layernorm(hidden)  # (L, d)
            mlp_out = layer.mlp(normed2)  # (L, d), before the residual
            if ttv is not None:
                ttv += transprune.transition_variation(normed, attn_out, ttv_direction)
                ttv += transprune.transition_variation(normed2, mlp_out, ttv_direction)
            hidden = hidden + mlp_out
        return ProbeSignals(ttv=ttv, iga=out_iga, logits=out_logits)


def decoder_qkv(attn: nn.Module, normed: torch.Tensor, positions: torch.Tensor):
    """q (L, H, D), k (L, Hkv, D), v (L, Hkv, D) after the layer's q/k norms and RoPE."""
    length = normed.shape[0]
    qkv, _ = attn.qkv_proj(normed)  # (L, (H + 2 Hkv) D)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = q.contiguous(), k.contiguous()  # vLLM's CPU rotary kernel rotates in place
    if getattr(attn, "q_norm", None) is not None:  # per-head q/k norms (Qwen3-style), absent in Llama/Qwen2
        q = attn.q_norm(q.view(length, -1, attn.head_dim)).reshape(length, -1)
        k = attn.k_norm(k.view(length, -1, attn.head_dim)).reshape(length, -1)
    q, k = attn.rotary_emb(positions, q, k)
    d = attn.head_dim
    return q.view(length, -1, d), k.view(length, -1, d), v.reshape(length, -1, d)


def causal_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(H, n, L) fp32 scaled logits, -inf where a key follows its query (AIM's input; same scale as
    :func:`vlmprune.signals.attention.attention_logits`). ``q`` holds the last ``n`` rows of the
    ``L`` keys (n = L: square; n < L: the first rows' keys come from the cache)."""
    n, heads, d = q.shape
    length = k.shape[0]
    kk = k.float().repeat_interleave(heads // k.shape[1], dim=1)  # (L, H, D)
    out = torch.einsum("qhd,khd->hqk", q.float(), kk) / math.sqrt(d)
    causal = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=length - n)
    return out.masked_fill(~causal[None], float("-inf"))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal softmax attention (L, H, D), GQA by repeating key/value heads."""
    heads = q.shape[1]
    rep = heads // k.shape[1]
    qh = q.transpose(0, 1)[None]  # (1, H, L, D)
    kh = k.repeat_interleave(rep, dim=1).transpose(0, 1)[None]
    vh = v.repeat_interleave(rep, dim=1).transpose(0, 1)[None]
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)  # (L, H, D)


# --- From signals to a reduction ------------------------------------------------------------------


def probe_layers(policy: Any) -> int:
    """Decoder layers a policy's probe runs (explain reads layer 0 only)."""
    return 1 if policy.method == "explain" else int(policy.probe_layers)


@dataclass
class ProbeRecord:
    """One probed image (diagnostics: ``start_probe_log`` / ``probe_log``)."""

    method: str
    rows: torch.Tensor
    """(m, d) rows the probe saw (after AIM's merge)."""
    positions: torch.Tensor
    """(m + t,) or (3, m + t) probe positions."""
    instruction_ids: torch.Tensor
    prunable: torch.Tensor
    """(m,) bool."""
    scores: torch.Tensor
    """(m_prunable,) the method's score of each prunable row, in row order."""
    kept: torch.Tensor
    """(k,) kept rows of the m probed rows, ascending (prunable and fixed)."""
    index: torch.Tensor
    """(k,) the image token each kept row stands for."""
    layers: int


def reduce_with_probe(
    probe: ShallowProbe,
    policy: Any,
    family: str,
    image: ImageTokens,
    instruction_ids: torch.Tensor,
    num_layers: int,
    *,
    grid_positions: torch.Tensor | None = None,
    explain_model: Any = None,
    log: list[ProbeRecord] | None = None,
) -> TokenReduction:
    """One image's reduction under an instruction-aware policy; ``kept_count(n, ratio)`` prunable rows
    (of every view, summed: :func:`vlmprune.policy.image_kept_count`).

    ``grid_positions`` (3, n_tokens): Qwen's (t, h, w) ids of the image tokens relative to the
    image start (None for LLaVA's 1-D positions). ``explain_model``: the RelevanceCNN (explain).
    ``log``: where to append a :class:`ProbeRecord` (None: no record).
    """
    method = policy.method
    if method not in ("transprune", "aim", "explain"):
        raise ValueError(f"method {method!r} does not use the shallow probe")
    keep = image_kept_count(image.view_sizes, policy.ratio)
    device = image.features.device

    # 1. AIM merges first (to its schedule's LLM-input count), the probe prunes the merged rows.
    if method == "aim":
        base = reduce_image(policy, family, image, num_layers=num_layers)
    else:
        base = TokenReduction.identity(image.n_tokens, device=device)
    index = base.index.to(device)  # (m,) image token each row stands for
    rows = base.apply(image.features).to(image.features.dtype)  # (m, d)
    prunable = image.prunable.to(device).bool()[index]  # (m,)
    candidates = prunable.nonzero().squeeze(1)  # (m_prunable,)
    if keep >= candidates.numel():
        return base

    # 2. The probe over [rows, instruction].
    ids = instruction_ids.to(device).long().reshape(-1)
    if ids.numel() == 0:
        raise RuntimeError(f"vlmprune: method {method!r} reached the model without instruction ids")
    m, t = rows.shape[0], ids.numel()
    if grid_positions is None:
        positions = torch.arange(m + t, device=device)  # (L,)
    else:
        full = grid_positions.to(device).long()  # (3, n_tokens)
        start = int(full.max()) + 1
        text = torch.arange(start, start + t, device=device).expand(3, t)
        positions = torch.cat([full[:, index], text], dim=1)  # (3, L)
    layers = probe_layers(policy)
    if method == "transprune":
        signals = probe.run(rows, positions, ids, layers, ttv_direction=policy.direction, iga=True)
        scores = transprune.combine(signals.ttv[candidates], signals.iga[candidates])
    elif method == "aim":
        signals = probe.run(rows, positions, ids, layers, logits=True)
        importance = aim.pagerank_importance(
            signals.logits, temperature=policy.pagerank_temperature, iterations=policy.pagerank_iterations
        )  # (L,)
        scores = importance[candidates]
    else:
        if explain_model is None:
            raise RuntimeError("vlmprune: method 'explain' reached the model without its RelevanceCNN")
        signals = probe.run(rows, positions, ids, layers, iga=True)
        scores = explain_model.relevance(signals.iga[candidates].to(next(explain_model.parameters()).device))
        scores = scores.to(device)

    # 3. Top ``keep`` prunable rows + every fixed row, ascending.
    chosen = candidates[topk_sorted(scores, keep).to(device)]
    keep_mask = ~prunable
    keep_mask[chosen] = True
    kept = keep_mask.nonzero().squeeze(1)  # (k,)
    if log is not None:
        log.append(
            ProbeRecord(
                method=method,
                rows=rows.detach().cpu(),
                positions=positions.cpu(),
                instruction_ids=ids.cpu(),
                prunable=prunable.cpu(),
                scores=scores.detach().float().cpu(),
                kept=kept.cpu(),
                index=index[kept].cpu(),
                layers=layers,
            )
        )
    features = None if base.features is None else rows[kept]
    return TokenReduction(index=index[kept], features=features)


# --- The explain CNN, once per worker ------------------------------------------------------------


def explain_checkpoint(policy: Any, model_dir: str) -> Path:
    """The CNN weights a policy uses: ``checkpoint`` or ``vlmprune_explain_cnn.pt`` beside the model.

    Raises :class:`PolicyError` naming the path when the file does not exist.
    """
    if policy.checkpoint is not None:
        path = Path(policy.checkpoint)
        if not path.is_file():
            raise PolicyError(f"field 'checkpoint': no such file (got {policy.checkpoint!r})")
        return path
    path = Path(model_dir) / EXPLAIN_CHECKPOINT
    if not path.is_file():
        raise PolicyError(
            "method 'explain' needs relevance-CNN weights: no 'checkpoint' was given and none is shipped "
            f"with the served model (looked for {path})"
        )
    return path


_CNN_CACHE: dict[tuple[str, float], Any] = {}


def load_explain_model(path: Path) -> Any:
    """The RelevanceCNN at ``path``, loaded once per process (keyed by path and modification time).

    A file that is not a RelevanceCNN checkpoint, or whose weights hold NaN/inf, raises
    :class:`PolicyError` naming it.
    """
    from vlmprune.core.explain import RelevanceCNN

    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _CNN_CACHE:
        try:
            _CNN_CACHE[key] = RelevanceCNN.load(path, map_location="cpu").eval()
        except Exception as exc:  # a corrupt or foreign file: the request fails, the engine stays
            raise PolicyError(f"field 'checkpoint': {path} is not a loadable RelevanceCNN ({exc})") from None
        bad = [name for name, p in _CNN_CACHE[key].named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            del _CNN_CACHE[key]
            raise PolicyError(f"field 'checkpoint': {path} has non-finite weights ({', '.join(bad)})")
    return _CNN_CACHE[key]


# --- What a vlmprune model holds -------------------------------------------------------------------


class ModelProbe:
    """A served model's probe: its LM's :class:`ShallowProbe`, the model directory (explain's default
    weights), the explain CNNs moved to the features' device, and an optional diagnostics log."""

    def __init__(self, lm: nn.Module, model_dir: str) -> None:
        self.probe = ShallowProbe(lm)
        self.model_dir = model_dir
        self.log: list[ProbeRecord] | None = None
        self._cnn: dict[tuple[str, str], Any] = {}

    def explain_model(self, policy: Any, device: torch.device) -> Any:
        path = explain_checkpoint(policy, self.model_dir)
        key = (str(path.resolve()), str(device))
        if key not in self._cnn:
            import copy

            self._cnn[key] = copy.deepcopy(load_explain_model(path)).to(device).eval()
        return self._cnn[key]

    def reduce(
        self,
        item: Any,
        image: ImageTokens,
        family: str,
        num_layers: int,
        grid_positions: torch.Tensor | None = None,
    ) -> TokenReduction:
        """:func:`reduce_with_probe` for one image's :class:`~vlmprune.vllm_plugin.fields.ItemPolicy`."""
        policy = item.policy
        device = image.features.device
        cnn = self.explain_model(policy, device) if policy.method == "explain" else None
        return reduce_with_probe(
            self.probe,
            policy,
            family,
            image,
            item.instruction_ids,
            num_layers,
            grid_positions=grid_positions,
            explain_model=cnn,
            log=self.log,
        )


# --- Diagnostics (tests, debugging), through ``LLM.apply_model`` -----------------------------------


def start_probe_log(model: nn.Module) -> bool:
    """Record every probed image of this worker's model from now on (:func:`probe_log` reads it)."""
    probe = getattr(model, "_vlmprune_probe", None)
    if not isinstance(probe, ModelProbe):
        return False
    probe.log = []
    return True


def probe_log(model: nn.Module, clear: bool = True) -> list[dict[str, Any]]:
    """The records since :func:`start_probe_log` (dicts of CPU tensors), oldest first; ``clear``
    empties the log."""
    probe = getattr(model, "_vlmprune_probe", None)
    records = list(probe.log or []) if isinstance(probe, ModelProbe) else []
    if clear and isinstance(probe, ModelProbe) and probe.log is not None:
        probe.log.clear()
    return [dict(vars(r)) for r in records]


__all__ = [
    "EXPLAIN_CHECKPOINT",
    "ModelProbe",
    "ProbeRecord",
    "ProbeSignals",
    "ShallowProbe",
    "explain_checkpoint",
    "load_explain_model",
    "probe_layers",
    "probe_log",
    "reduce_with_probe",
    "start_probe_log",
]
