"""Qwen2-VL and Qwen2.5-VL adapters for the transformers reference backend.

Both models pack every image of a batch into one ViT sequence (block-diagonal attention per image,
``cu_seqlens``), group 2x2 neighbouring patches (``merge = spatial_merge_size``) into one LLM token
with the PatchMerger, and give the LLM 3-D M-RoPE positions (t, h, w). Qwen2.5-VL additionally
runs most ViT blocks on windows: inside the blocks the merge groups are permuted into window order
(``window_index``) and the merger output is put back with ``argsort(window_index)``.

There is no [CLS] token, so ``CLS_ATTENTION`` is the mean softmax attention each patch *receives*
at one full-attention block (Qwen2-VL: the last block; Qwen2.5-VL: the last of
``fullatt_block_indexes``), recomputed from that block's q/k captured by hooks during the single
stock vision forward (any attention kernel), then mean-pooled over each merge group exactly as the
merger groups the patches. Pruned sequences keep their original M-RoPE ids
(``reindex_after_pruning = False``), as vLLM's own EVS does.

Shapes: ``T`` ViT patches of the batch, ``N = T / merge**2`` merged tokens, ``H`` ViT heads,
``D`` ViT head dim, ``L`` one row's unpadded sequence length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from transformers.vision_utils import get_vision_window_index

from vlmprune.backends.hf.base import ModelAdapter, Sequence
from vlmprune.reduction.image_tokens import CLS_ATTENTION, MERGE_METRIC, ImageTokens
from vlmprune.reduction.qwen_pooling import pool_merge_groups
from vlmprune.reduction.stages import instruction_start
from vlmprune.signals.attention import mean_attention_received

_SUPPORTED_SIGNALS = frozenset({CLS_ATTENTION, MERGE_METRIC})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def vision_qk(qkv: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor], num_heads: int):
    """q, k (T, H*D) of a Qwen ViT block, rotated exactly as its attention rotates them.

    ``qkv`` (T, 3*H*D) is the block's ``attn.qkv`` output; ``position_embeddings`` = (cos, sin),
    each (T, D), as the block receives them. Like ``apply_rotary_pos_emb_vision``: RoPE in fp32,
    result cast back to the projection dtype (what the attention kernel then consumes).
    """
    t = qkv.shape[0]
    q, k, _ = qkv.reshape(t, 3, num_heads, -1).unbind(1)  # each (T, H, D)
    cos, sin = (x.unsqueeze(-2).float() for x in position_embeddings)  # (T, 1, D)
    out = []
    for x in (q, k):
        xf = x.float()
        out.append((xf * cos + _rotate_half(xf) * sin).to(x.dtype).reshape(t, -1))
    return out[0], out[1]


class _BlockQKCapture:
    """Holds one ViT block's attention inputs for the duration of a forward (hooks read, never write)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.block = block
        self.qkv: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles: list[Any] = []

    def _attn_pre(self, module, args, kwargs) -> None:
        self.cu_seqlens = kwargs["cu_seqlens"]
        self.position_embeddings = kwargs["position_embeddings"]

    def _qkv_out(self, module, args, output) -> None:
        self.qkv = output.detach()

    def __enter__(self) -> "_BlockQKCapture":
        attn = self.block.attn
        self._handles = [
            attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True),
            attn.qkv.register_forward_hook(self._qkv_out),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _QwenVLAdapter(ModelAdapter):
    """What Qwen2-VL and Qwen2.5-VL share: packed ViT, 2x2 merger, M-RoPE via ``get_rope_index``."""

    reindex_after_pruning: ClassVar[bool] = False

    # -- model parts -----------------------------------------------------------------------------
    @property
    def _vlm(self) -> Any:
        """The ``Qwen2(_5)VLModel`` inside the ``...ForConditionalGeneration`` wrapper."""
        return self.model.model

    @property
    def text_model(self) -> Any:
        return self._vlm.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def _merge(self) -> int:
        return int(self._vlm.visual.spatial_merge_size)

    def score_block(self) -> int:
        """Index of the ViT block whose attention gives ``CLS_ATTENTION`` (a full-attention block)."""
        raise NotImplementedError

    def _to_original_order(self, merged: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(N,) merged-token values in the blocks' order -> merger-output (LLM) order."""
        return merged

    # -- images ----------------------------------------------------------------------------------
    def images_per_row(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        is_image = ids == self.model.config.image_token_id  # (B, S)
        if mask is not None:
            is_image = is_image & mask.bool()
        starts = is_image.clone()
        starts[:, 1:] &= ~is_image[:, :-1]  # first token of each contiguous placeholder run
        counts = [int(n) for n in starts.sum(dim=1).tolist()]
        grid_thw = inputs.get("image_grid_thw")
        n_images = 0 if grid_thw is None else int(grid_thw.shape[0])
        if sum(counts) != n_images:
            raise ValueError(
                f"the prompts hold {sum(counts)} image placeholder runs but image_grid_thw has {n_images} images"
            )
        return counts

    def encode_images(self, inputs: Mapping[str, torch.Tensor], needs: frozenset[str]) -> list[ImageTokens]:
        unknown = set(needs) - _SUPPORTED_SIGNALS
        if unknown:
            raise ValueError(
                f"signals {sorted(unknown)} are not available for model family {self.family!r}; "
                f"it provides: {sorted(_SUPPORTED_SIGNALS)}"
            )
        pixel_values, grid_thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pixel_values is None:
            return []
        if grid_thw is None:
            raise ValueError("inputs hold pixel_values but no image_grid_thw")
        if bool((grid_thw[:, 0] != 1).any()):
            raise ValueError(f"images must have t = 1 in image_grid_thw, got {grid_thw.tolist()}")
        merge = self._merge

        # 1. One stock vision forward; a hook captures the scoring block's q/k inputs if needed.
        capture = _BlockQKCapture(self._vlm.visual.blocks[self.score_block()]) if CLS_ATTENTION in needs else None
        if capture is None:
            out = self._vlm.get_image_features(pixel_values, grid_thw, return_dict=True)
        else:
            with capture:
                out = self._vlm.get_image_features(pixel_values, grid_thw, return_dict=True)
        features = list(out.pooler_output)  # per image (n_i, d_lm)

        # 2. Mean attention received per patch, pooled per merge group, in LLM order.
        scores: list[torch.Tensor] | None = None
        if capture is not None:
            if capture.qkv is None or capture.position_embeddings is None:
                raise RuntimeError(f"ViT block {self.score_block()} did not run; cannot score {CLS_ATTENTION!r}")
            with torch.no_grad():
                num_heads = self._vlm.visual.blocks[self.score_block()].attn.num_heads
                q, k = vision_qk(capture.qkv, capture.position_embeddings, num_heads)  # (T, H*D) each
                received = mean_attention_received(q, k, num_heads, cu_seqlens=capture.cu_seqlens)  # (T,)
                merged = pool_merge_groups(received, merge * merge)  # (N,) blocks' order
                merged = self._to_original_order(merged, grid_thw)  # (N,) LLM order
            scores = list(merged.split([f.shape[0] for f in features]))

        # 3. One ImageTokens per image.
        images = []
        for i, (feat, (_, h, w)) in enumerate(zip(features, grid_thw.tolist())):
            signals: dict[str, torch.Tensor] = {}
            if scores is not None:
                signals[CLS_ATTENTION] = scores[i]
            if MERGE_METRIC in needs:
                signals[MERGE_METRIC] = feat
            images.append(
                ImageTokens(
                    features=feat,
                    prunable=torch.ones(feat.shape[0], dtype=torch.bool, device=feat.device),
                    grid=(h // merge, w // merge),
                    signals=signals,
                )
            )
        return images

    # -- sequence --------------------------------------------------------------------------------
    def build_sequence(self, inputs: Mapping[str, torch.Tensor], row: int, images: list[ImageTokens]) -> Sequence:
        """Row ``row`` without its padding: stock embeddings (image features scattered into the
        ``<|image_pad|>`` slots) and the stock ``get_rope_index`` 3-D positions."""
        config = self.model.config
        ids_all, mask = inputs["input_ids"], inputs.get("attention_mask")
        keep = torch.ones_like(ids_all[row], dtype=torch.bool) if mask is None else mask[row].bool()
        ids = ids_all[row][keep]  # (L,)
        per_row = self.images_per_row(inputs)
        if len(images) != per_row[row]:
            raise ValueError(f"row {row} holds {per_row[row]} images, got ImageTokens for {len(images)}")

        # 1. Embeddings: token embeddings, then the image features in placeholder order.
        embeds = self.text_model.embed_tokens(ids)  # (L, d)
        is_image = ids == config.image_token_id  # (L,)
        slots = is_image.nonzero().squeeze(1)  # (n_img_tokens,)
        sizes = [im.n_tokens for im in images]
        if slots.numel() != sum(sizes):
            raise ValueError(
                f"row {row} has {slots.numel()} image placeholders but its images hold {sum(sizes)} tokens"
            )
        if images:
            feats = torch.cat([im.features for im in images]).to(embeds.device, embeds.dtype)  # (n_img_tokens, d)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats)

        # 2. Positions: the stock M-RoPE ids of this row (3, L).
        first = sum(per_row[:row])
        if images:
            grid_thw = inputs["image_grid_thw"][first : first + len(images)]
            token_type = inputs.get("mm_token_type_ids")
            token_type = is_image.long() if token_type is None else token_type[row][keep]
            positions, _ = self._vlm.get_rope_index(
                ids.unsqueeze(0), mm_token_type_ids=token_type.unsqueeze(0), image_grid_thw=grid_thw
            )
            positions = positions[:, 0]  # (3, L)
        else:
            positions = torch.arange(ids.shape[0], device=ids.device).unsqueeze(0).expand(3, -1)

        # 3. Spans and instruction: the text after the last image's <|vision_end|>, to the end.
        spans = list(slots.split(sizes))
        start = instruction_start(ids, int(spans[-1][-1]) + 1, config.vision_end_token_id) if images else 0
        instruction = torch.arange(start, ids.shape[0], device=ids.device)
        return Sequence(
            embeds=embeds, positions=positions, input_ids=ids, image_spans=spans, instruction_index=instruction
        )


class Qwen2VLAdapter(_QwenVLAdapter):
    """Qwen2-VL: every ViT block attends over the whole image; scores from the last block."""

    family: ClassVar[str] = "qwen2_vl"

    def score_block(self) -> int:
        return len(self._vlm.visual.blocks) - 1


class Qwen25VLAdapter(_QwenVLAdapter):
    """Qwen2.5-VL: window attention except in ``fullatt_block_indexes``; scores from the last of
    those, mapped out of window order with the model's own ``argsort(window_index)``."""

    family: ClassVar[str] = "qwen2_5_vl"

    def score_block(self) -> int:
        full = list(self._vlm.visual.fullatt_block_indexes)
        if not full:
            raise ValueError(
                f"{self.family}: vision_config.fullatt_block_indexes is empty, so no full-attention block can be scored"
            )
        return int(max(full))

    def _to_original_order(self, merged: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self._vlm.visual
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )  # (N,) the merge group at each window-order slot
        return merged[torch.argsort(window_index).to(merged.device)]
