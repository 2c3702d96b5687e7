"""The transformers reference backend: stock model parts, exact paper semantics, real token removal.

Flow of one call: chat template + processor over every request -> the adapter runs the vision
tower ONCE, batched over all images (with the hooks the method's signals need) -> per request
(no padding, batch size 1 in the LLM, simple and exact):

1. the adapter lays out the full, unpruned LLM input exactly as the stock model would;
2. each image is reduced at the LLM input (:func:`vlmprune.reduction.reduce.reduce_image`);
3. the pruned sequence keeps all text and the kept visual tokens; positions are re-indexed
   ``0..L'-1`` (LLaVA family, as stock LLaVA and vLLM) or the original ids are gathered (Qwen);
4. pre-LLM / instruction-aware methods: the stock text model with a ``DynamicCache``;
   progressive methods (TransPrune, AIM, FastV): :func:`progressive_prefill` removes tokens between
   layers.

Ratio 0 runs exactly the stock computation (no reduction, the stock text model), so its logits
equal ``model(**inputs, logits_to_keep=1)`` bitwise.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from vlmprune.backends.hf.base import ModelAdapter, Sequence
from vlmprune.core import explain
from vlmprune.core.select import TokenReduction
from vlmprune.methods import require_support
from vlmprune.policy import PolicyError, PolicyT, parse_policy
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.reduce import (
    needs_instruction_attention,
    prunable_values,
    reduce_image,
    signals_needed,
)
from vlmprune.reduction.plan import plan_image, request_stages
from vlmprune.reduction.stages import check_policy_depth
from vlmprune.signals.attention import instruction_attention

# Family (config.model_type) -> "module:Class", imported on first use so that a family whose
# adapter is missing (or whose transformers classes are absent) does not break the others.
ADAPTERS: dict[str, str] = {
    "llava": "vlmprune.backends.hf.llava:LlavaAdapter",
    "llava_next": "vlmprune.backends.hf.llava_next:LlavaNextAdapter",
    "qwen2_vl": "vlmprune.backends.hf.qwen2_vl:Qwen2VLAdapter",
    "qwen2_5_vl": "vlmprune.backends.hf.qwen2_vl:Qwen25VLAdapter",
}

EXPLAIN_CHECKPOINT = explain.CHECKPOINT_NAME


def family_of(model: Any) -> str:
    """The model family of a transformers VLM (its ``config.model_type``), if supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported by the reference backend; "
            f"supported: {', '.join(ADAPTERS)}"
        )
    return model_type


def adapter_for(model: Any, processor: Any) -> ModelAdapter:
    """The family adapter wrapping ``model`` (a ``...ForConditionalGeneration``) and its processor."""
    family = family_of(model)
    module_name, _, class_name = ADAPTERS[family].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"the adapter for model family {family!r} is not available: {exc}") from exc
    return cls(model, processor)


@dataclass
class Request:
    """One chat request: the user's text and its images (placed before the text in one user turn)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    preamble: str | None = None
    """An earlier text-only exchange before this turn (a long context, say): never the instruction,
    and before every image whatever the chat template does with a turn's text (:func:`chat_messages`)."""


def chat_messages(prompt: str, num_images: int, preamble: str | None = None) -> list[dict[str, Any]]:
    """The chat of one request: optionally ``preamble`` as an earlier user turn (answered ``ok .``),
    then one user turn with the images, then the text."""
    turn = {"role": "user", "content": [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]}
    if preamble is None:
        return [turn]
    return [{"role": "user", "content": [{"type": "text", "text": preamble}]},
            {"role": "assistant", "content": [{"type": "text", "text": "ok ."}]}, turn]


class Decoder:
    """Continues one prefilled request token by token (greedy decoding, teacher forcing)."""

    def __init__(
        self,
        backend: ReferenceBackend,
        cache: DynamicCache | None,
        positions: torch.Tensor | None,
        state: Any = None,
    ) -> None:
        self._backend = backend
        self._cache = cache
        self._positions = positions  # positions of the last appended tokens ((m,) or (3, m))
        self._state = state  # a ProgressiveState for progressive methods

    @torch.no_grad()
    def extend(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Append ``m`` tokens; (m, V) logits, row i predicting the token after token i."""
        adapter = self._backend.adapter
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self._backend.device).reshape(-1)  # (m,)
        if ids.numel() == 0:
            raise ValueError("token_ids must not be empty")
        embeds = self._backend.model.get_input_embeddings()(ids)  # (m, d)
        if self._state is not None:
            hidden = self._state.extend(embeds)  # (m, d), final-normed
            return adapter.lm_head(hidden[None])[0]
        positions = adapter.next_positions(self._positions, ids.numel())
        out = adapter.text_model(
            inputs_embeds=embeds[None],
            position_ids=_batched_positions(positions),
            past_key_values=self._cache,
            use_cache=True,
        )
        self._positions = positions
        return adapter.lm_head(out.last_hidden_state)[0]

    def fork(self) -> Decoder:
        """An independent copy (its own KV cache), e.g. to score several continuations."""
        if self._state is not None:
            state = dataclasses.replace(
                self._state, cache=copy.deepcopy(self._state.cache), next_positions=list(self._state.next_positions)
            )
            return Decoder(self._backend, None, None, state)
        return Decoder(self._backend, copy.deepcopy(self._cache), self._positions.clone())


@dataclass
class Prefill:
    """One request after prefill."""

    logits: torch.Tensor
    """(V,) next-token logits at the last prompt position."""
    sequence: Sequence
    """The LLM input actually prefilled (text + kept/merged visual tokens)."""
    visual_tokens: int
    """Prunable visual tokens before reduction (all images)."""
    kept_tokens: int
    """Prunable visual tokens at the LLM input (progressive methods remove more inside the LLM)."""
    fixed_tokens: int
    """Visual tokens that are never pruned (LLaVA-NeXT image_newline tokens), also in ``sequence``."""
    decoder: Decoder
    kept_per_layer: list[int] | None = None
    """Progressive methods: visual tokens in each decoder layer's input."""
    images: list[ImageTokens] | None = None
    """The request's images before reduction (features, signals, token geometry), in prompt order."""
    kept_index: list[torch.Tensor] | None = None
    """Per image, (k_i,) indices into that image's tokens (``images[i]`` order; LLaVA-1.5: raster
    patch order) of the tokens at the LLM input, non-prunable ones included; for merging methods
    (AIM, pool) the token each merged value stands in for. Lets tools show *which* tokens were
    kept, not only how many (``vlmprune visualize``)."""
    final_kept_index: list[torch.Tensor] | None = None
    """Per image, the subset of ``kept_index`` that reaches the last decoder layer (progressive
    methods prune further inside the LLM); equal to ``kept_index`` for every other method."""


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    """Tokens prefilled by the LLM (text + kept visual tokens)."""
    visual_tokens: int
    kept_tokens: int


class ReferenceBackend:
    """Pruned inference on a transformers VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL)."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter_for(model, processor)
        self._explain_cache: dict[str, Any] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | None = None):
        """Load a hub-layout checkpoint directory (model + processor) from local disk."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        if device is not None:
            model = model.to(device)
        return cls(model, processor)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # -- inputs -------------------------------------------------------------------------------------
    def process(self, requests: list[Request]) -> Mapping[str, torch.Tensor]:
        """Chat template (one user turn: images, then text, then the generation prompt) + processor."""
        if not requests:
            raise ValueError("requests must not be empty")
        texts = []
        for req in requests:
            texts.append(
                self.processor.apply_chat_template(
                    chat_messages(req.prompt, len(req.images), req.preamble), add_generation_prompt=True, tokenize=False
                )
            )
        images = [im for req in requests for im in req.images]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": len(requests) > 1}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs)
        dtype = self.model.dtype
        return {
            k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }

    # -- prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        requests: list[Request],
        policy: PolicyT | Mapping[str, Any] | None = None,
        explain_model: Any = None,
    ) -> list[Prefill]:
        """Prefill every request under ``policy``; the vision tower runs once over all images.

        ``explain_model``: stands in for an explain policy's CNN (anything with ``relevance(attn
        (n,)) -> (n,)``): the quality benchmark's ``explain-input`` and ``oracle`` rows, never served."""
        policy = _as_policy(policy)
        require_support(policy.method, self.family)
        check_policy_depth(policy, len(self.adapter.text_model.layers))
        if explain_model is None and policy.method == "explain" and policy.ratio > 0:
            explain_model = self._explain_model(policy)
        needs = signals_needed(policy.method, self.family) if policy.ratio > 0 else frozenset()
        return [
            self._prefill_one(seq, row_images, policy, explain_model)
            for seq, row_images in self.sequences(requests, needs)
        ]

    @torch.no_grad()
    def sequences(
        self, requests: list[Request], needs: frozenset[str] = frozenset()
    ) -> list[tuple[Sequence, list[ImageTokens]]]:
        """Per request, its full unpruned LLM input and its images (with the signals in ``needs``).

        The first half of :meth:`prefill`, public so that offline tools (the explain CNN's
        trainer) see exactly the sequence the pruned prefill starts from."""
        inputs = self.process(requests)
        images = self.adapter.encode_images(inputs, needs)
        per_row = self.adapter.images_per_row(inputs)
        expected = [len(r.images) for r in requests]
        if per_row != expected:
            raise ValueError(f"images per request {expected} do not match the processed prompts {per_row}")
        out, cursor = [], 0
        for row in range(len(requests)):
            row_images = images[cursor : cursor + per_row[row]]
            cursor += per_row[row]
            out.append((self.adapter.build_sequence(inputs, row, row_images), row_images))
        return out

    @torch.no_grad()
    def explain_inputs(self, seq: Sequence, images: list[ImageTokens]) -> list[torch.Tensor]:
        """Per image, the relevance CNN's input for this sequence: layer-0 instruction attention
        over the image's prunable tokens, (n_prunable,) fp32.

        The same calls, in the same order, as the explain path of :meth:`_prefill_one` and
        :func:`reduce_image`; the CNN's trainer uses this so training and inference cannot drift."""
        iattn = self._instruction_attention(seq)  # (L,)
        return [prunable_values(im, iattn[span])[1] for im, span in zip(images, seq.image_spans)]

    def _prefill_one(self, seq: Sequence, images: list[ImageTokens], policy: Any, explain_model: Any) -> Prefill:
        text_model = self.adapter.text_model
        num_layers = len(text_model.layers)

        # 1. Reduce every image at the LLM input.
        iattn = None
        if any(needs_instruction_attention(policy, self.family, im.view_sizes, num_layers) for im in images):
            iattn = self._instruction_attention(seq)  # (L,)
        reductions = [
            reduce_image(
                policy,
                self.family,
                im,
                instruction_attention=None if iattn is None else iattn[span],
                explain_model=explain_model,
                num_layers=num_layers,
            )
            for im, span in zip(images, seq.image_spans)
        ]
        reindex_input = self.adapter.reindex_after_pruning and not (
            policy.method == "transprune" and policy.positions == "original"
        )
        pruned, prunable_spans = apply_reductions(seq, images, reductions, reindex=reindex_input)
        kept_index = [red.index for red in reductions]
        visual = sum(im.n_prunable for im in images)
        kept = sum(int(s.numel()) for s in prunable_spans)
        fixed = sum(im.n_tokens - im.n_prunable for im in images)

        # 2. Progressive methods: later stages inside the LLM (only when one of them removes tokens).
        stages = request_stages([plan_image(policy, self.family, im.view_sizes, num_layers, route="reference")
                                 for im in images])
        if stages:
            from vlmprune.backends.hf.progressive import progressive_prefill

            reindex = self.adapter.reindex_after_pruning and policy.method == "transprune" and (
                policy.positions == "reindex"
            )
            state = progressive_prefill(text_model, pruned, prunable_spans, stages, policy, reindex=reindex)
            logits = self.adapter.lm_head(state.hidden[None, -1:])[0, -1]
            decoder = Decoder(self, None, None, state)
            # pruned.image_spans[i][j] is the row of reductions[i].index[j] (apply_reductions keeps
            # the pairing), so the rows still present at the end map back to image-local indices.
            final_index = [
                index[torch.isin(span, state.kept_index.to(span.device)).to(index.device)]
                for index, span in zip(kept_index, pruned.image_spans)
            ]
            return Prefill(logits, pruned, visual, kept, fixed, decoder, list(state.kept_per_layer),
                           images=images, kept_index=kept_index, final_kept_index=final_index)

        # 3. Otherwise the stock text model over the pruned sequence.
        cache = DynamicCache(config=text_model.config)
        out = text_model(
            inputs_embeds=pruned.embeds[None],
            position_ids=_batched_positions(pruned.positions),
            past_key_values=cache,
            use_cache=True,
        )
        # lm_head on a (1, 1, d) slice, exactly as the stock forward with logits_to_keep=1.
        logits = self.adapter.lm_head(out.last_hidden_state[:, -1:])[0, -1]
        decoder = Decoder(self, cache, pruned.positions)
        return Prefill(logits, pruned, visual, kept, fixed, decoder,
                       images=images, kept_index=kept_index, final_kept_index=kept_index)

    def _instruction_attention(self, seq: Sequence) -> torch.Tensor:
        """Layer-0 attention from the instruction rows to every token of the unpruned sequence, (L,)."""
        if seq.instruction_index.numel() == 0:
            raise ValueError("this method needs instruction text after the last image, and the prompt has none")
        text_model = self.adapter.text_model
        rope = text_model.rotary_emb(seq.embeds[None], _batched_positions(seq.positions))
        return instruction_attention(text_model.layers[0], seq.embeds, rope, seq.instruction_index)

    def _explain_model(self, policy: Any) -> Any:
        from vlmprune.core.explain import RelevanceCNN

        path = policy.checkpoint
        if path is None:
            shipped = Path(str(getattr(self.model, "name_or_path", "") or "")) / EXPLAIN_CHECKPOINT
            if not shipped.is_file():
                raise PolicyError(
                    "method 'explain' needs relevance-CNN weights: no 'checkpoint' was given and none is shipped "
                    f"for this model (looked for {shipped})"
                )
            path = str(shipped)
        if not Path(path).is_file():
            raise PolicyError(f"field 'checkpoint': no such file (got {path!r})")
        if path not in self._explain_cache:
            self._explain_cache[path] = RelevanceCNN.load(path, map_location=self.device).eval()
        return self._explain_cache[path]

    # -- user-facing verbs --------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, requests: list[Request], policy: PolicyT | Mapping[str, Any] | None = None) -> torch.Tensor:
        """(B, V) next-token logits at the end of each prompt."""
        return torch.stack([p.logits for p in self.prefill(requests, policy)])

    @torch.no_grad()
    def generate(
        self,
        requests: list[Request],
        policy: PolicyT | Mapping[str, Any] | None = None,
        max_new_tokens: int = 16,
        explain_model: Any = None,
    ) -> list[Generation]:
        """Greedy decoding; stops at an end-of-sequence token or after ``max_new_tokens``
        (``explain_model``: as in :meth:`prefill`)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        results = []
        for pre in self.prefill(requests, policy, explain_model):
            tokens = self.greedy_tokens(pre, max_new_tokens)
            results.append(
                Generation(
                    token_ids=tokens,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_tokens=pre.sequence.length,
                    visual_tokens=pre.visual_tokens,
                    kept_tokens=pre.kept_tokens,
                )
            )
        return results

    @torch.no_grad()
    def greedy_tokens(self, pre: Prefill, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prefill: token ids up to and including an end-of-sequence
        token, at most ``max_new_tokens``."""
        eos = self.eos_ids()
        tokens: list[int] = []
        logits = pre.logits
        while True:
            token = int(logits.argmax())
            tokens.append(token)
            if token in eos or len(tokens) >= max_new_tokens:
                return tokens
            logits = pre.decoder.extend([token])[-1]

    @torch.no_grad()
    def score(
        self, request: Request, candidates: list[str], policy: PolicyT | Mapping[str, Any] | None = None
    ) -> list[float]:
        """Sum of log-probabilities of each candidate answer's tokens after the prompt.

        One prefill, then each candidate is teacher-forced through its own copy of the KV cache.
        Candidates are tokenized alone (no special tokens), as text that directly follows the prompt.
        """
        if not candidates:
            raise ValueError("candidates must not be empty")
        pre = self.prefill([request], policy)[0]
        first = torch.log_softmax(pre.logits.float(), dim=-1)  # (V,)
        scores = []
        for cand in candidates:
            ids = self.tokenizer(cand, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"candidate {cand!r} tokenizes to no tokens")
            total = float(first[ids[0]])
            if len(ids) > 1:
                logits = pre.decoder.fork().extend(ids[:-1])  # (m-1, V)
                logp = torch.log_softmax(logits.float(), dim=-1)
                total += float(logp.gather(1, torch.tensor(ids[1:], device=logp.device)[:, None]).sum())
            scores.append(total)
        return scores

    def eos_ids(self) -> set[int]:
        """Token ids that end a greedy continuation (the generation config's, else the tokenizer's)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def apply_reductions(
    seq: Sequence,
    images: list[ImageTokens],
    reductions: list[TokenReduction],
    *,
    reindex: bool,
) -> tuple[Sequence, list[torch.Tensor]]:
    """The pruned sequence (all text + each image's kept or merged tokens, in sequence order) and,
    per image, the rows of its kept *prunable* tokens in it (what later stages may still prune).

    Positions: ``0..L'-1`` when ``reindex``, else each kept token's original id (a merged token
    takes the id of the token it stands for)."""
    device = seq.embeds.device
    is_visual = torch.zeros(seq.length, dtype=torch.bool, device=device)  # (L,)
    for span in seq.image_spans:
        is_visual[span] = True
    rows = [(~is_visual).nonzero().squeeze(1)]  # original index of every surviving row
    embeds = [seq.embeds[rows[0]]]
    prunable_rows = []
    identity = True
    for im, span, red in zip(images, seq.image_spans, reductions):
        idx = red.index.to(device)
        rows.append(span[idx])
        embeds.append(red.apply(seq.embeds[span]).to(seq.embeds.dtype))
        prunable_rows.append(span[idx[im.prunable[idx].to(device)]])
        identity = identity and red.features is None and idx.numel() == span.numel()
    if identity:
        return seq, prunable_rows

    orig = torch.cat(rows)  # (L',) original index, unsorted
    order = torch.argsort(orig)
    orig = orig[order]
    new_embeds = torch.cat(embeds)[order]  # (L', d)
    length = orig.numel()

    def remap(index: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(orig, index.to(device))

    positions = (
        _contiguous_like(seq.positions, length) if reindex else seq.positions[..., orig.to(seq.positions.device)]
    )
    pruned = Sequence(
        embeds=new_embeds,
        positions=positions,
        input_ids=seq.input_ids[orig.to(seq.input_ids.device)],
        image_spans=[remap(r) for r in rows[1:]],
        instruction_index=remap(seq.instruction_index),
    )
    return pruned, [remap(r) for r in prunable_rows]


def _contiguous_like(positions: torch.Tensor, length: int) -> torch.Tensor:
    ar = torch.arange(length, device=positions.device, dtype=positions.dtype)
    return ar if positions.ndim == 1 else ar.unsqueeze(0).expand(positions.shape[0], length).contiguous()


def _batched_positions(positions: torch.Tensor) -> torch.Tensor:
    """(L,) -> (1, L); M-RoPE (3, L) -> (3, 1, L), the layouts the text models take."""
    return positions[None] if positions.ndim == 1 else positions[:, None]


def _as_policy(policy: PolicyT | Mapping[str, Any] | None) -> PolicyT:
    if policy is None:
        return parse_policy({"method": "fastervlm", "ratio": 0.0})
    return parse_policy(policy)
