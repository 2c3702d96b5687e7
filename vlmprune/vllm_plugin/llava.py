"""LLaVA-1.5 in vLLM with per-request visual-token pruning (``LlavaForConditionalGeneration``).

Processor: the stock one plus the policy fields (:mod:`vlmprune.vllm_plugin.processor`, :mod:`vlmprune.vllm_plugin.fields`); each image's
placeholder run shrinks to ``kept_count(576, ratio)`` (any prunable count: the rule is the
reference backend's). Model: the stock one; ``embed_multimodal`` runs the stock vision tower and
projector once, with a forward hook on the last *loaded* ViT layer's ``qkv_proj``, and keeps or
merges rows with :func:`vlmprune.reduction.reduce.reduce_image` (the routing into
:mod:`vlmprune.core` that the transformers backend uses too); the instruction-aware methods go
through the model's shallow LM probe (:mod:`vlmprune.vllm_plugin.probe`).

Which ViT layer: vLLM builds the CLIP tower only up to ``vision_feature_layer`` (-2 for LLaVA), so
the last loaded layer is Hugging Face's penultimate layer: exactly FasterVLM's layer. The signals
read from the *last* ViT layer (AIM's merge keys, GlobalCom2's [CLS] logits, as their official code
and the transformers backend) are per-token functions of the last loaded layer's output, so
:class:`FinalLayerQK` loads just that layer's ``layer_norm1`` and q/k projections from the
checkpoint and computes them exactly (two C x C matrices; the rest of the layer never runs).

Pixtral-HF checkpoints share the architecture name; they keep the stock processor and model path
(no pruning; an engine-default policy makes the model refuse to start, and a per-request key is
ignored by their stock processor).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from vlmprune.policy import PolicyError
from vlmprune.reduction.image_tokens import CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC, ImageTokens
from vlmprune.reduction.projector import projection, projector_input_capture
from vlmprune.reduction.reduce import reduce_image, signals_needed
from vlmprune.signals.attention import cls_attention_from_qk
from vlmprune.methods import IN_LLM_FAMILIES, policy_in_llm, route
from vlmprune.vllm_plugin.engine_checks import check_engine_in_llm
from vlmprune.vllm_plugin.inllm import InLLMForward
from vlmprune.vllm_plugin.probe import ModelProbe
from vlmprune.vllm_plugin.fallback import guarded
from vlmprune.vllm_plugin.tensor_parallel import gather_heads, head_shards, mean_over_shards
from vlmprune.vllm_plugin.tracing import record_kept
from vlmprune.vllm_plugin.engine_checks import check_engine
from vlmprune.vllm_plugin.fields import item_count, ItemPolicy, pop_item_policies
from vlmprune.vllm_plugin.processor import policy_free_context, PolicyProcessorMixin
from vlmprune.vllm_plugin.request_policy import PLUGIN_METHODS, PROBE_METHODS
from vlmprune.wire import POLICY_KEY

# --- Vision-side signals ------------------------------------------------------------------------


FINAL_LAYER_SIGNALS = frozenset({CLS_LOGITS, MERGE_METRIC})
"""Signals of the last ViT layer (AIM's merge keys, GlobalCom2's [CLS] logits)."""

_CLIP_QK_WEIGHT = re.compile(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.(layer_norm1|self_attn\.q_proj|self_attn\.k_proj)\.(weight|bias)$")


class FinalLayerQK(nn.Module):
    """The last CLIP layer's ``layer_norm1`` and q/k projections, beside vLLM's shortened tower.

    vLLM drops the last layer's weights (the LLM reads the penultimate layer's output), yet AIM
    merges by that layer's keys and GlobalCom2 scores by its [CLS] logits. Its q and k are
    ``proj(layer_norm1(h))`` of the last *loaded* layer's output ``h``, row by row, so these weights
    give them exactly; :meth:`take` collects them during ``load_weights``.
    """

    def __init__(self, config: CLIPVisionConfig, layer: int) -> None:
        super().__init__()
        width = int(config.hidden_size)
        self.layer = layer
        self.heads = int(config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=float(config.layer_norm_eps))
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self._taken: set[str] = set()

    def take(self, checkpoint_name: str, weight: torch.Tensor) -> bool:
        """Copy ``weight`` if it is one of this layer's tensors (True: consumed)."""
        match = _CLIP_QK_WEIGHT.search(checkpoint_name)
        if match is None or int(match.group(1)) != self.layer:
            return False
        name = f"{match.group(2).removeprefix('self_attn.')}.{match.group(3)}"
        with torch.no_grad():
            self.get_parameter(name).copy_(weight)
        self._taken.add(name)
        return True

    def loaded_names(self, prefix: str) -> set[str]:
        """The parameter names for vLLM's loaded-weights check; raises if the checkpoint lacked one."""
        missing = {name for name, _ in self.named_parameters()} - self._taken
        if missing:
            raise RuntimeError(f"vlmprune: the checkpoint has no {sorted(missing)} of ViT layer {self.layer} "
                               "(AIM and GlobalCom2 score with the last ViT layer)")
        return {f"{prefix}.{name}" for name in self._taken}

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k), each (B, T, C), of the last layer from its input ``hidden`` (B, T, C)."""
        x = self.layer_norm1(hidden)
        return self.q_proj(x), self.k_proj(x)


def final_layer_qk(vision_tower: nn.Module, config: CLIPVisionConfig) -> FinalLayerQK | None:
    """The module a tower built one layer short needs (None when the last layer is loaded, or when
    the tower stops earlier: then the last loaded layer stands in, a documented deviation)."""
    loaded = len(vision_tower.vision_model.encoder.layers)
    total = int(config.num_hidden_layers)
    return FinalLayerQK(config, total - 1) if loaded == total - 1 else None


@contextmanager
def clip_signals(vision_tower: nn.Module, needs: frozenset[str], final: FinalLayerQK | None = None
                 ) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
    """Capture the [CLS] signals in ``needs`` during one tower run.

    CLS_ATTENTION (FasterVLM) is the last loaded layer's: a hook reads the ``qkv_proj`` output the
    layer computes anyway (no attention matrix, any attention kernel). The last ViT layer's signals
    (:data:`FINAL_LAYER_SIGNALS`) come from ``final`` applied to the last loaded layer's output, or,
    without ``final`` (the whole tower is loaded, or a shallower feature layer), from the last
    loaded layer's own q/k. Yields a callable returning ``name -> (B, P)`` (CLS_ATTENTION,
    CLS_LOGITS) or ``(B, P, C)`` (MERGE_METRIC: keys), ``B`` = ViT passes in call order.
    """
    needs = frozenset(needs) & {CLS_ATTENTION, CLS_LOGITS, MERGE_METRIC}
    if not needs:
        yield dict
        return
    last = vision_tower.vision_model.encoder.layers[-1]
    attn = last.self_attn
    heads = int(getattr(attn, "num_heads_per_partition", attn.num_heads))  # this rank's
    shards = head_shards(heads, int(attn.num_heads))  # > 1: a tensor-parallel tower
    qkvs: list[torch.Tensor] = []
    hiddens: list[torch.Tensor] = []
    use_final = final is not None and bool(needs & FINAL_LAYER_SIGNALS)

    def qkv_hook(_module: nn.Module, _args: Any, output: Any) -> None:
        qkvs.append((output[0] if isinstance(output, tuple) else output).detach())  # (B, T, 3C)

    def output_hook(_module: nn.Module, _args: Any, output: Any) -> None:
        hiddens.append((output[0] if isinstance(output, tuple) else output).detach())  # (B, T, C)

    def read() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        local = heads
        if qkvs:
            q, k, _ = torch.cat(qkvs).chunk(3, dim=-1)  # (B, T, C / shards) each, CLIPAttention's own split
            if CLS_ATTENTION in needs:
                out[CLS_ATTENTION] = mean_over_shards(cls_attention_from_qk(q, k, heads), shards)  # (B, P)
        if use_final:
            with torch.no_grad():
                q, k = final(torch.cat(hiddens))  # the last ViT layer's own q, k: every head (replicated)
            local, split = int(attn.num_heads), 1
        else:
            split = shards
        if CLS_LOGITS in needs:
            out[CLS_LOGITS] = mean_over_shards(cls_attention_from_qk(q, k, local, logits=True), split)  # (B, P)
        if MERGE_METRIC in needs:
            out[MERGE_METRIC] = gather_heads(k[:, 1:].float(), split, dim=-1)  # (B, P, C)
        return out

    handles = []
    if CLS_ATTENTION in needs or not use_final:
        handles.append(attn.qkv_proj.register_forward_hook(qkv_hook))
    if use_final:
        handles.append(last.register_forward_hook(output_hook))
    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()


def needed_signals(items: Sequence[ItemPolicy], family: str) -> frozenset[str]:
    """Union of the signals the active policies of a batch score with."""
    out: set[str] = set()
    for item in items:
        if item.active:
            out |= signals_needed(item.policy.method, family)
    return frozenset(out)


def reduce_rows(
    item: ItemPolicy,
    image: ImageTokens,
    family: str,
    num_layers: int,
    index: int,
    probe: Any = None,
    **extra: Any,
) -> torch.Tensor:
    """One image's rows for the LLM: the reduction of ``image`` under ``item``'s policy.

    Instruction-aware methods (``PROBE_METHODS``) go through ``probe``, the model's
    :class:`vlmprune.vllm_plugin.probe.ModelProbe` (a shallow probe of the served LM over [image
    rows + ``item.instruction_ids``]); the others through :func:`reduce_image`, with ``extra``
    passed on.
    """
    def choose():
        if not item.active:
            return None
        if policy_in_llm(item.policy, family):
            # In-LLM stages (vlmprune.vllm_plugin.inllm): TransPrune and explain keep every row here, AIM merges
            # to its schedule's LLM-input count (reduce_image's count for the progressive methods).
            if item.policy.method == "aim":
                return reduce_image(item.policy, family, image, num_layers=num_layers, **extra)
            return None
        if item.policy.method in PROBE_METHODS:
            return probe.reduce(item, image, family, num_layers)
        return reduce_image(item.policy, family, image, num_layers=num_layers, **extra)

    reduction, failure = guarded(item, family, image.prunable, choose)
    rows = image.features if reduction is None else reduction.apply(image.features)
    if rows.shape[0] != item.count:
        raise RuntimeError(
            f"vlmprune: image {index} gives {rows.shape[0]} rows but the processor reserved {item.count} "
            f"placeholders (policy {item.policy}); the processor and the model disagree"
        )
    if reduction is not None:
        record_kept(item, family, reduction.index, image.n_tokens, image, fallback=failure)
    else:  # kept whole; LLaVA-NeXT's placeholder ImageTokens here carries no geometry
        record_kept(item, family, torch.arange(image.n_tokens), image.n_tokens,
                    grid=None if family == "llava_next" else image.grid)
    return rows


def vision_unsupported(hf_config: Any) -> str | None:
    """Why a LLaVA-family config cannot be pruned here (None when it can)."""
    if not isinstance(hf_config.vision_config, CLIPVisionConfig):
        return f"only CLIP vision towers are supported, got {type(hf_config.vision_config).__name__}"
    if hf_config.vision_feature_select_strategy != "default":
        return (
            f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}; "
            "'default' is needed (the [CLS] token is a score source, not a visual token)"
        )
    if not isinstance(hf_config.vision_feature_layer, int):
        return "a list of vision_feature_layer values is not supported"
    return None


# --- Processor ----------------------------------------------------------------------------------


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Stock info whose Hugging Face processor never receives the plugin's key."""

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(POLICY_KEY, None)
        return super().get_hf_processor(**kwargs)


class LlavaFamilyPromptMixin:
    """Placeholder runs of the counts the processor attached (stock count without a policy)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_index  # type: ignore[attr-defined]
        stock = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items=mm_items, hf_processor_mm_kwargs=hf_processor_mm_kwargs, out_mm_kwargs=out_mm_kwargs
        )
        if not stock:
            return stock
        (stock_update,) = stock

        def replacement(item_idx: int):
            count = item_count(out_mm_kwargs, item_idx)
            if count is not None:
                return [image_token_id] * count
            # No fields: pixel inputs always get them, so these are image_embeds inputs.
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems) and self.vlmprune_request(hf_processor_mm_kwargs).active:  # type: ignore[attr-defined]
                raise PolicyError("vlmprune needs images (pixel inputs); it cannot prune image_embeds inputs")
            return stock_update.replacement(item_idx)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class PrunedLlavaMultiModalProcessor(PolicyProcessorMixin, LlavaFamilyPromptMixin, LlavaMultiModalProcessor):
    """LLaVA-1.5 processor: every image is one grid of prunable tokens."""

    vlmprune_family = "llava"
    vlmprune_methods = PLUGIN_METHODS

    def _vlmprune_unsupported(self) -> str | None:
        return vision_unsupported(self.info.get_hf_config())

    def _vlmprune_token_parts(self, hf_inputs: Any) -> list[tuple[int, int]]:
        pixel_values = hf_inputs.get("pixel_values")
        if pixel_values is None:
            return []
        size = self.info.get_vision_encoder_info().get_image_size()
        n = self.info.get_num_image_tokens(image_width=size, image_height=size)
        return [(n, 0)] * len(pixel_values)


def _build_info(ctx):
    """Pixtral-HF keeps vLLM's stock info; CLIP LLaVA gets the policy-aware one."""
    from transformers import LlavaConfig, PixtralVisionConfig

    if isinstance(ctx.get_hf_config(LlavaConfig).vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return PrunedLlavaProcessingInfo(policy_free_context(ctx))


def _build_processor(info, dummy_inputs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    return PrunedLlavaMultiModalProcessor(info, dummy_inputs)


# --- Model --------------------------------------------------------------------------------------


class LlavaPruningMixin:
    """Model-side start-up and stock pass-through shared by the LLaVA-family subclasses.

    Put it before the stock model class: ``__init__`` checks the engine before the stock
    constructor runs, and :meth:`_vlmprune_items` answers requests without an active policy with
    the stock ``embed_multimodal``, untouched."""

    vlmprune_family: str
    vlmprune_methods = PLUGIN_METHODS

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        model_name = str(vllm_config.model_config.model)
        default = check_engine(vllm_config, model_name, self.vlmprune_family, self.vlmprune_methods)
        if self.vlmprune_family in IN_LLM_FAMILIES:
            check_engine_in_llm(vllm_config, model_name)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vlmprune_reason = vision_unsupported(self.config)
        if default.policy is not None and self._vlmprune_reason is not None:
            raise RuntimeError(f"vlmprune cannot apply the engine default policy to {model_name}: {self._vlmprune_reason}")
        self.vlmprune_final_qk = (final_layer_qk(self.vision_tower, self.config.vision_config)
                                  if self._vlmprune_reason is None else None)
        self._vlmprune_layers = int(self.config.text_config.num_hidden_layers)
        self._vlmprune_probe = ModelProbe(self.language_model.model, model_name)
        if route() == "in_llm" and self.vlmprune_family in IN_LLM_FAMILIES:
            vc = self.config.vision_config
            InLLMForward(self.language_model.model, self.vlmprune_family, (vc.image_size // vc.patch_size) ** 2,
                         self._vlmprune_in_llm_layout(), explain_model=self._vlmprune_probe.explain_model).install()

    def _vlmprune_in_llm_layout(self) -> Any:
        """The in-LLM stages' per-image layout (:func:`vlmprune.vllm_plugin.inllm_plan.request_plan`);
        None: one grid, every placeholder row prunable (LLaVA-1.5)."""
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The stock loading, with the last ViT layer's q/k tensors kept for :class:`FinalLayerQK`
        (the stock tower drops them)."""
        final = self.vlmprune_final_qk
        if final is None:
            return super().load_weights(weights)  # type: ignore[misc]
        loaded = super().load_weights((n, w) for n, w in weights if not final.take(n, w))  # type: ignore[misc]
        return set(loaded) | final.loaded_names("vlmprune_final_qk")

    def _vlmprune_stock_grid(self) -> tuple[int, int] | None:
        """The token grid of an unpruned image (LLaVA-NeXT has several views: None)."""
        if self.vlmprune_family != "llava":
            return None
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size,) * 2

    def _vlmprune_items(self, kwargs: dict) -> tuple[list[ItemPolicy] | None, Any]:
        """``(items, None)`` when some image has an active policy, else ``(items, stock embeddings)``."""
        items = pop_item_policies(kwargs)  # type: ignore[arg-type]
        if items is None or not any(item.active for item in items):
            embeds = super().embed_multimodal(**kwargs)  # the stock path, untouched
            check_stock_counts(items, embeds)
            for item, rows in zip(items or (), embeds):
                record_kept(item, self.vlmprune_family, torch.arange(rows.shape[0]), rows.shape[0],
                            grid=self._vlmprune_stock_grid())
            return items, embeds
        if self._vlmprune_reason is not None:
            raise RuntimeError(f"vlmprune: {self._vlmprune_reason}")
        return items, None


@MULTIMODAL_REGISTRY.register_processor(_build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaPruningMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 whose ``embed_multimodal`` returns each image's kept (or merged) rows."""

    vlmprune_family = "llava"

    def embed_multimodal(self, **kwargs: object):
        items, stock = self._vlmprune_items(kwargs)
        if stock is not None:
            return stock
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        needs = needed_signals(items, self.vlmprune_family)
        with (
            clip_signals(self.vision_tower, needs, self.vlmprune_final_qk) as read_signals,
            projector_input_capture(self.multi_modal_projector, needs, side * side) as read_inputs,
        ):
            embeds = super().embed_multimodal(**kwargs)
            signals = {**read_signals(), **read_inputs()}  # name -> (B, P) or (B, P, C)
        if len(embeds) != len(items):
            raise RuntimeError(f"vlmprune: {len(embeds)} images encoded for {len(items)} policies")
        out = []
        for i, (item, feats) in enumerate(zip(items, embeds)):
            image = ImageTokens(
                features=feats,  # (P, d)
                prunable=torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device),
                grid=(side, side),
                signals={name: value[i] for name, value in signals.items()},
                project=projection(self.multi_modal_projector),
            )
            out.append(reduce_rows(item, image, self.vlmprune_family, self._vlmprune_layers, i, self._vlmprune_probe))
        return out


def check_stock_counts(items: Sequence[ItemPolicy] | None, embeds: Sequence[torch.Tensor]) -> None:
    """Without an active policy each image must fill exactly its (stock) placeholder run."""
    if items is None:
        return
    if len(embeds) != len(items):
        raise RuntimeError(f"vlmprune: {len(embeds)} images encoded for {len(items)} policies")
    for i, (item, rows) in enumerate(zip(items, embeds)):
        if rows.shape[0] != item.count:
            raise RuntimeError(f"vlmprune: image {i} gives {rows.shape[0]} rows, the processor reserved {item.count}")
