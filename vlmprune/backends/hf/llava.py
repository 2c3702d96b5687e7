"""LLaVA-1.5 adapter (transformers ``LlavaForConditionalGeneration``): CLIP ViT + projector + LLM.

Features come from the model's own ``get_image_features`` (run once, batched over every image);
the [CLS] signals are captured by hooks on the CLIP layers during that same run
(:mod:`vlmprune.backends.hf.vision_hooks`). The LLM input is laid out exactly as the stock forward
does it: embed the prompt ids, write the image features into the image-token positions,
positions ``arange(L)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlmprune.backends.hf.base import ModelAdapter, Sequence
from vlmprune.backends.hf.vision_hooks import cls_signal_capture
from vlmprune.reduction.image_tokens import ImageTokens
from vlmprune.reduction.projector import projection, projector_input_capture
from vlmprune.reduction.stages import instruction_start


class LlavaFamilyAdapter(ModelAdapter):
    """What LLaVA-1.5 and LLaVA-NeXT share: the LLM side and the prompt layout."""

    reindex_after_pruning = True

    def __init__(self, model: Any, processor: Any) -> None:
        super().__init__(model, processor)
        strategy = model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={strategy!r} is not supported: the LLaVA adapters need "
                "'default' (the [CLS] token is a score source, not a visual token)"
            )

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def text_model(self) -> Any:
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def _vision_grid(self) -> tuple[int, int]:
        """Patch grid of one ViT pass (rows, cols), e.g. 24x24 for CLIP-L/14 at 336 px."""
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        return side, side

    def _row_ids(self, inputs: Mapping[str, torch.Tensor], row: int) -> torch.Tensor:
        """Row ``row``'s prompt ids without padding, (L,)."""
        ids = inputs["input_ids"][row]
        mask = inputs.get("attention_mask")
        return ids if mask is None else ids[mask[row].bool()]

    def tokens_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Visual tokens of every image of the batch, in order (without running the vision tower)."""
        raise NotImplementedError

    def images_per_row(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        counts = self.tokens_per_image(inputs)
        out, cursor = [], 0
        for row in range(inputs["input_ids"].shape[0]):
            need = int((self._row_ids(inputs, row) == self.image_token_id).sum())
            taken = 0
            while need > 0:
                if cursor >= len(counts):
                    raise ValueError(f"batch row {row} has more image tokens than the images provide")
                need -= counts[cursor]
                cursor += 1
                taken += 1
            if need != 0:
                raise ValueError(f"batch row {row}: image tokens do not line up with its images' token counts")
            out.append(taken)
        if cursor != len(counts):
            raise ValueError(f"{len(counts)} images given but the prompts hold placeholders for {cursor}")
        return out

    def build_sequence(self, inputs: Mapping[str, torch.Tensor], row: int, images: list[ImageTokens]) -> Sequence:
        ids = self._row_ids(inputs, row)  # (L,)
        embeds = self.model.get_input_embeddings()(ids)  # (L, d)
        image_pos = (ids == self.image_token_id).nonzero().squeeze(1)  # (n_total,)
        sizes = [im.n_tokens for im in images]
        if image_pos.numel() != sum(sizes):
            raise ValueError(
                f"batch row {row} has {image_pos.numel()} image tokens but its images give {sum(sizes)} features"
            )
        if images:
            # The stock forward's masked_scatter, as an exact row copy.
            embeds = embeds.clone()
            embeds[image_pos] = torch.cat([im.features for im in images]).to(embeds.device, embeds.dtype)
        spans = list(torch.split(image_pos, sizes)) if images else []
        start = instruction_start(ids, int(image_pos[-1]) + 1 if image_pos.numel() else 0)
        length = ids.shape[0]
        return Sequence(
            embeds=embeds,
            positions=torch.arange(length, device=ids.device),
            input_ids=ids,
            image_spans=spans,
            instruction_index=torch.arange(start, length, device=ids.device),
        )


class LlavaAdapter(LlavaFamilyAdapter):
    """LLaVA-1.5: one ViT pass per image, every patch a visual token (24x24 = 576 at 336 px)."""

    family = "llava"

    def tokens_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        rows, cols = self._vision_grid()
        return [rows * cols] * int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else []

    def encode_images(self, inputs: Mapping[str, torch.Tensor], needs: frozenset[str]) -> list[ImageTokens]:
        if "pixel_values" not in inputs:
            return []
        grid = self._vision_grid()
        projector = self.model.model.multi_modal_projector
        with (
            cls_signal_capture(self.model.model.vision_tower, self.model.config.vision_feature_layer, needs) as read_signals,
            projector_input_capture(projector, needs, grid[0] * grid[1]) as read_inputs,
        ):
            out = self.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
            signals = {**read_signals(), **read_inputs()}  # name -> (B, P) or (B, P, C)
        features = out.pooler_output  # list of (P, d)
        images = []
        for i, feats in enumerate(features):
            n = feats.shape[0]
            if n != grid[0] * grid[1]:
                raise ValueError(f"image {i} gave {n} features, expected a {grid[0]}x{grid[1]} patch grid")
            images.append(
                ImageTokens(
                    features=feats,
                    prunable=torch.ones(n, dtype=torch.bool, device=feats.device),
                    grid=grid,
                    signals={name: value[i] for name, value in signals.items()},
                    project=projection(projector),
                )
            )
        return images
