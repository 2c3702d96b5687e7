"""LLaVA-NeXT in vLLM with per-request visual-token pruning (``LlavaNextForConditionalGeneration``).

Count: an image is its base (thumbnail) view plus the stitched, unpadded crop grid, with one
``image_newline`` token ending every crop-grid row. Newlines are never pruned and not counted:
``count = sum(kept_count(view, ratio) for view in (base, *crops)) + newlines`` (each crop counted
after unpadding; FasterVLM's official code budgets every view by itself), each part taken from vLLM's own
``LlavaNextProcessingInfo.get_num_image_tokens`` arithmetic (:meth:`PrunedLlavaNextMultiModalProcessor._vlmprune_token_parts`).

Selection: the stock tower runs once over every view (hooked as in :mod:`vlmprune.vllm_plugin.llava`);
the stock ``_merge_image_patch_embeddings`` packs the features. To know which view, crop and grid
cell each packed row came from, the same vLLM function packs a one-channel tensor of source
indices (newline = -1) - so the layout matches the features by construction - and
:func:`vlmprune.reduction.anyres.packed_image_tokens` turns it into the
:class:`~vlmprune.reduction.image_tokens.ImageTokens` geometry, as the transformers backend does.
``reduce_image`` then decides (FasterVLM per view, GlobalCom2's
thumbnail-guided crop budgets, ``random``, ``pool`` per view, AIM's merge per view).

GlobalCom2's [CLS] logits and AIM's merge keys are the *last* ViT layer's, as in the transformers
backend, although vLLM builds the tower one layer short: :class:`~vlmprune.vllm_plugin.llava.FinalLayerQK`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmprune.reduction.anyres import crop_view_sizes, packed_image_tokens, source_indices
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.projector import projection, projector_input_capture
from vlmprune.vllm_plugin.processor import policy_free_context, PolicyProcessorMixin
from vlmprune.vllm_plugin.request_policy import PLUGIN_METHODS
from vlmprune.wire import POLICY_KEY
from vlmprune.vllm_plugin.llava import (
    LlavaFamilyPromptMixin,
    LlavaPruningMixin,
    clip_signals,
    needed_signals,
    reduce_rows,
    vision_unsupported,
)

# --- Processor ----------------------------------------------------------------------------------


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Stock info whose Hugging Face processor never receives the plugin's key."""

    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(POLICY_KEY, None)
        return super().get_hf_processor(**kwargs)

    def get_num_image_token_parts(self, *, image_width: int, image_height: int) -> tuple[tuple[int, ...], int]:
        """(prunable tokens per view, newline tokens) of one image: the base view, then each crop's
        tokens left after unpadding (row-major), and one newline per unpadded row.

        The same terms, from the same functions, as the stock ``get_num_image_tokens``; the crops
        split the unpadded grid as :func:`vlmprune.reduction.anyres.crop_view_sizes` says.
        """
        hf_config = self.get_hf_config()
        encoder = self.get_vision_encoder_info()
        base = get_num_selected_vision_tokens(
            encoder.get_num_image_tokens(image_width=image_width, image_height=image_height),
            hf_config.vision_feature_select_strategy,
        )
        gh, gw = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=hf_config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        unpadded, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=gh,
            num_patch_width=gw,
        )
        total = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        if base + unpadded + newlines != total:
            raise RuntimeError(f"LLaVA-NeXT token parts {base}+{unpadded}+{newlines} != stock count {total}")
        side = encoder.get_patch_grid_length()
        crops = crop_view_sizes(side, (gh, gw), (newlines, unpadded // newlines)) if newlines else (0,) * (gh * gw)
        return (base, *crops), newlines


class PrunedLlavaNextMultiModalProcessor(PolicyProcessorMixin, LlavaFamilyPromptMixin, LlavaNextMultiModalProcessor):
    """LLaVA-NeXT processor: prunes base + crop tokens, keeps every newline token."""

    vlmprune_family = "llava_next"
    vlmprune_methods = PLUGIN_METHODS

    def _vlmprune_unsupported(self) -> str | None:
        return vision_unsupported(self.info.get_hf_config())

    def _vlmprune_token_parts(self, hf_inputs: Any) -> list[tuple[tuple[int, ...], int]]:
        sizes = hf_inputs.get("image_sizes")
        if sizes is None or hf_inputs.get("pixel_values") is None:
            return []
        return [
            self.info.get_num_image_token_parts(image_width=int(w), image_height=int(h))
            for h, w in torch.as_tensor(sizes).tolist()
        ]


def _build_info(ctx):
    return PrunedLlavaNextProcessingInfo(policy_free_context(ctx))


# --- Geometry -----------------------------------------------------------------------------------


def packed_sources(model: LlavaNextForConditionalGeneration, image_size: torch.Tensor, views: int) -> torch.Tensor:
    """For each packed row of one image: its source ``view * P + patch`` (-1 for newline rows); (n,).

    Runs vLLM's own ``_merge_image_patch_embeddings`` on a (views, P, 1) tensor of indices, with a
    newline "embedding" of -1, so the mapping follows exactly the stock stitching and unpadding.
    """
    vc = model.config.vision_config
    index = source_indices(views, (vc.image_size // vc.patch_size) ** 2)
    shim = SimpleNamespace(config=model.config, image_newline=torch.tensor([-1.0], dtype=torch.float64))
    packed = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
        shim, image_size, index, strategy="spatial_unpad"
    )  # (n, 1)
    return packed[:, 0].round().long()


# --- Model --------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextMultiModalProcessor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNext(LlavaPruningMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose ``embed_multimodal`` returns each image's kept (or merged) rows + newlines."""

    vlmprune_family = "llava_next"

    def _vlmprune_in_llm_layout(self):
        return self._vlmprune_image_layout

    def _vlmprune_image_layout(self, feature: Any, runner: Any) -> tuple[tuple[int, ...], torch.Tensor]:
        """(prunable tokens per view, (run,) bool prunable rows) of one image's placeholder run, for
        the in-LLM stages: the reference's spans hold an image's prunable rows only (newlines stay);
        the per-view counts give explain its per-view budget (``image_kept_count``), as the processor's.

        The prunable count and the stock run's newline rows follow from the image size through
        vLLM's own packing (:func:`packed_sources`). A run shorter than the stock one is AIM's merge
        at the input (rows in index order, newline rows untouched): its newline rows are the rows
        of the image's encoder output that are exactly ``image_newline``, checked against the count
        the geometry gives.
        """
        size = feature.data["image_sizes"].data  # (2,) height, width
        vc = self.config.vision_config
        gh, gw = get_anyres_image_grid_shape(tuple(int(x) for x in size.tolist()), self.config.image_grid_pinpoints, vc.image_size)
        views = 1 + int(gh) * int(gw)
        sources = packed_sources(self, size, views)  # (n_stock,), -1 = newline
        stock = sources >= 0
        per_view = tuple(torch.bincount(sources[stock] // ((vc.image_size // vc.patch_size) ** 2),
                                        minlength=views).tolist())  # base view, then each crop
        length = int(feature.mm_position.length)
        if length == stock.numel():
            return per_view, stock
        rows = None if runner is None else runner.encoder_cache.get(feature.identifier)
        if rows is None or rows.shape[0] != length:
            raise RuntimeError(f"vlmprune: no encoder output of {length} rows for image {feature.identifier!r} "
                               "at its in-LLM stage (LLaVA-NeXT needs it to find the newline rows)")
        newline = (rows == self.image_newline.to(rows.device, rows.dtype)).all(dim=-1)  # (run,)
        if int(newline.sum()) != int((~stock).sum()):
            raise RuntimeError(f"vlmprune: image {feature.identifier!r} has {int(newline.sum())} newline rows in its "
                               f"placeholder run, its geometry {int((~stock).sum())}")
        return per_view, (~newline).cpu()

    def embed_multimodal(self, **kwargs: object):
        items, stock = self._vlmprune_items(kwargs)
        if stock is not None:
            return stock
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            raise RuntimeError("vlmprune: an active policy reached the model without pixel inputs")
        pixel_values = image_input["pixel_values"]
        views = [int(v.shape[0]) for v in pixel_values]  # per image, padding views included
        image_sizes = image_input.get("image_sizes")

        # 1. Stock features and the hooked signals, one tower run over every view.
        vc = self.config.vision_config
        side = vc.image_size // vc.patch_size
        needs = needed_signals(items, self.vlmprune_family)
        with (
            clip_signals(self.vision_tower, needs, self.vlmprune_final_qk) as read_signals,
            projector_input_capture(self.multi_modal_projector, needs, side * side) as read_inputs,
        ):
            embeds = self._process_image_input(image_input)  # list of (n_i, d)
            signals = {**read_signals(), **read_inputs()}  # name -> (sum(views), P) or (sum(views), P, C)
        if len(embeds) != len(items):
            raise RuntimeError(f"vlmprune: {len(embeds)} images encoded for {len(items)} policies")

        # 2. Per image: geometry of the packed rows, then the core's decision.
        out, start = [], 0
        for i, (item, feats) in enumerate(zip(items, embeds)):
            per_view = {name: value[start : start + views[i]] for name, value in signals.items()}
            start += views[i]
            if not item.active:
                out.append(reduce_rows(item, ImageTokens(feats, torch.ones(feats.shape[0], dtype=torch.bool), (side, side)), self.vlmprune_family, self._vlmprune_layers, i))
                continue
            size = image_sizes[i]
            sources = packed_sources(self, size, views[i])
            if sources.shape[0] != feats.shape[0]:
                raise RuntimeError(f"vlmprune: image {i} layout has {sources.shape[0]} rows, features {feats.shape[0]}")
            gh, gw = get_anyres_image_grid_shape(
                tuple(int(x) for x in size.tolist()), self.config.image_grid_pinpoints, vc.image_size
            )
            image = packed_image_tokens(feats, sources, per_view, (side, side), (int(gh), int(gw)),
                                        project=projection(self.multi_modal_projector))
            out.append(reduce_rows(item, image, self.vlmprune_family, self._vlmprune_layers, i, self._vlmprune_probe))
        return out
