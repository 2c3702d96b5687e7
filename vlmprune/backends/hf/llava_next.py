"""LLaVA-NeXT adapter (transformers ``LlavaNextForConditionalGeneration``): stock AnyRes.

Each image is a base (thumbnail) view plus a ``gh x gw`` grid of crops, each its own ViT pass; the
crops are stitched into one grid, the padding rows/cols are cut away (``unpad_image``) and an
``image_newline`` token ends every row (``spatial_unpad``). Features are the model's own
``get_image_features`` output. The per-token geometry and signals are laid out by running the
model's own ``pack_image_features`` a second time on a small side tensor of
[view, crop, row, col, signals...] channels, so they line up with the features by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vlmprune.backends.hf.llava import LlavaFamilyAdapter
from vlmprune.backends.hf.vision_hooks import cls_signal_capture
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.projector import projection, projector_input_capture

_GEOMETRY = 4  # side channels: view, crop, row, col


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

        # 2. Side tensor per view: geometry + signals, (V, P, 4 + S).
        views_per_image = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes
        ]
        names = sorted(signals)
        widths = [1 if signals[k].ndim == 2 else signals[k].shape[-1] for k in names]
        patch = torch.arange(h * w)
        side_list = []
        for i, size in enumerate(image_sizes):
            gh, gw = self._crop_grid(size)
            v = views_per_image[i]
            crop = torch.arange(v) - 1  # (v,): -1 = base view, else the crop id (row-major)
            view = (crop >= 0).float()
            crop_row = torch.where(crop >= 0, crop.div(gw, rounding_mode="floor"), 0)
            crop_col = torch.where(crop >= 0, crop % gw, 0)
            rows = crop_row[:, None] * h + patch[None] // w  # (v, P) row in the stitched grid
            cols = crop_col[:, None] * w + patch[None] % w  # (v, P)
            geometry = torch.stack(
                [view[:, None].expand(v, h * w), crop[:, None].expand(v, h * w).float(), rows.float(), cols.float()],
                dim=-1,
            )  # (v, P, 4)
            side_list.append(geometry)
        side = torch.cat(side_list)  # (V, P, 4)
        if names:
            sig = torch.cat(
                [signals[k].float().cpu().reshape(side.shape[0], h * w, -1) for k in names], dim=-1
            )  # (V, P, S)
            side = torch.cat([side, sig], dim=-1)
        newline = torch.cat([torch.full((_GEOMETRY,), -1.0), torch.zeros(side.shape[-1] - _GEOMETRY)])

        # 3. Lay the side channels out exactly like the features (stitch, unpad, newlines).
        packed, _ = self.model.model.pack_image_features(
            list(torch.split(side, views_per_image)),
            image_sizes,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            image_newline=newline,
        )

        images = []
        for i, (feats, lay) in enumerate(zip(features, packed)):
            if lay.shape[0] != feats.shape[0]:
                raise ValueError(f"image {i}: side layout has {lay.shape[0]} tokens, features {feats.shape[0]}")
            images.append(self._image_tokens(feats, lay, names, widths, self._crop_grid(image_sizes[i])))
        return images

    def _image_tokens(
        self,
        feats: torch.Tensor,
        lay: torch.Tensor,
        names: list[str],
        widths: list[int],
        crop_grid: tuple[int, int],
    ) -> ImageTokens:
        """ImageTokens from one image's features (n, d) and packed side channels (n, 4 + S)."""
        device = feats.device
        view = lay[:, 0].round().long()  # (n,)
        crop = lay[:, 1].round().long()
        coords = lay[:, 2:4].round().long()  # (n, 2), stitched-grid coordinates before unpadding
        in_crops = view == 1
        rows1 = cols1 = 0
        if in_crops.any():
            # Unpadding cut leading rows (or cols): shift view-1 coords to start at 0.
            top = coords[in_crops].min(dim=0).values
            coords[in_crops] -= top
            rows1, cols1 = (int(x) + 1 for x in coords[in_crops].max(dim=0).values)
        h, w = self._vision_grid()
        signals, offset = {}, _GEOMETRY
        for name, width in zip(names, widths):
            value = lay[:, offset : offset + width]
            signals[name] = (value[:, 0] if width == 1 else value).to(device)
            offset += width
        return ImageTokens(
            features=feats,
            prunable=(view >= 0).to(device),
            grid=(h, w),
            signals=signals,
            view=view.to(device),
            crop=crop.to(device),
            coords=coords.to(device),
            view_shape=[(h, w), (rows1, cols1)],
            crop_grid=crop_grid,
            project=projection(self.model.model.multi_modal_projector),
        )
