"""LLaVA-NeXT adapter (transformers ``LlavaNextForConditionalGeneration``): stock AnyRes.

Each image is a base (thumbnail) view plus a ``gh x gw`` grid of crops, each its own ViT pass; the
crops are stitched into one grid, the padding rows/cols are cut away (``unpad_image``) and an
``image_newline`` token ends every row (``spatial_unpad``). Features are the model's own
``get_image_features`` output. The per-token geometry is read from a tensor of source indices that the
model's own ``pack_image_features`` lays out a second time, so it lines up with the features by
construction (:func:`vlmprune.reduction.anyres.packed_image_tokens`, shared with the vLLM plugin).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vlmprune.backends.hf.llava import LlavaFamilyAdapter
from vlmprune.backends.hf.vision_hooks import cls_signal_capture
from vlmprune.reduction.anyres import packed_image_tokens, source_indices
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.projector import projection, projector_input_capture


class LlavaNextAdapter(LlavaFamilyAdapter):
    """LLaVA-NeXT (1.6) with stock AnyRes ``spatial_unpad`` packing and newline tokens."""

    family = "llava_next"

    def _crop_grid(self, image_size: torch.Tensor) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = self.model.config
        gh, gw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        return int(gh), int(gw)

    def tokens_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Packed token count of every image, from its size alone (the stock unpad arithmetic)."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        if "image_sizes" not in inputs:
            return []
        h, w = self._vision_grid()
        out = []
        for size in inputs["image_sizes"]:
            gh, gw = self._crop_grid(size)
            rows, cols = unpad_image(torch.empty(0, gh * h, gw * w), size).shape[1:]
            out.append(h * w + rows * (cols + 1))
        return out

    def encode_images(self, inputs: Mapping[str, torch.Tensor], needs: frozenset[str]) -> list[ImageTokens]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if "pixel_values" not in inputs or inputs["pixel_values"].shape[0] == 0:
            return []
        cfg = self.model.config
        image_sizes = inputs["image_sizes"]

        # 1. Stock features (one batched ViT run over every view of every image) + [CLS] signals.
        h, w = self._vision_grid()
        projector = self.model.model.multi_modal_projector
        with (
            cls_signal_capture(self.model.model.vision_tower, cfg.vision_feature_layer, needs) as read_signals,
            projector_input_capture(projector, needs, h * w) as read_inputs,
        ):
            out = self.model.model.get_image_features(inputs["pixel_values"], image_sizes, return_dict=True)
            signals = {**read_signals(), **read_inputs()}  # name -> (V, P) or (V, P, C), V = all views
        features = out.pooler_output  # list of (n_i, d), packed

        # 2. Each view's patches numbered, laid out like the features (stitch, unpad, newline = -1).
        views_per_image = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes
        ]
        index = source_indices(sum(views_per_image), h * w, torch.float32)  # (V, P, 1)
        packed, _ = self.model.model.pack_image_features(
            list(torch.split(index, views_per_image)),
            image_sizes,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0]),
        )

        # 3. Every row's view, crop and grid cell, and its signals (anyres: the vLLM plugin's rule too).
        images, start = [], 0
        project = projection(self.model.model.multi_modal_projector)
        for i, (feats, lay) in enumerate(zip(features, packed)):
            if lay.shape[0] != feats.shape[0]:
                raise ValueError(f"image {i}: source layout has {lay.shape[0]} tokens, features {feats.shape[0]}")
            per_view = {name: value[start : start + views_per_image[i]].float() for name, value in signals.items()}
            sources = lay[:, 0].round().long() - start * h * w  # this image's views count from 0
            sources[lay[:, 0] < 0] = -1
            start += views_per_image[i]
            images.append(packed_image_tokens(feats, sources.to(feats.device), per_view, (h, w),
                                              self._crop_grid(image_sizes[i]), project=project))
        return images
