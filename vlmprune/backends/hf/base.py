"""Shared data types of the transformers reference backend.

A model adapter (one per family: llava, llava_next, qwen2_vl, qwen2_5_vl) turns processor outputs
into :class:`ImageTokens` (projected features + the signals the pruners need, in the order the LLM
sees them) and a full, unpruned :class:`Sequence`; everything after that (pruning, the LLM forward,
decoding) is generic and lives in ``pipeline.py`` / ``progressive.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Signal names (keys of ImageTokens.signals); each is per visual token, in LLM order.
CLS_ATTENTION = "cls_attention"
"""(n,) FasterVLM score: [CLS]->patch softmax attention, head mean, penultimate ViT layer.
Qwen (no [CLS]): mean attention each patch receives at a full-attention block, pooled 2x2 like
the merger. LLaVA-NeXT: each view scored by its own ViT pass. Always-kept tokens (newlines): 0."""
CLS_LOGITS = "cls_logits"
"""(n,) GlobalCom2 score: [CLS]->patch pre-softmax logits, head mean, last ViT layer."""
MERGE_METRIC = "merge_metric"
"""(n, c) AIM's merge similarity metric: CLIP last-layer keys (LLaVA), projected features (Qwen)."""
VISION_FEATURES = "vision_features"
"""(n, c_vision) LLaVA family: the projector's input (the selected CLIP layer's patch features).
AIM merges these and projects the merged tokens (:attr:`ImageTokens.project`), as its official code."""


@dataclass
class ImageTokens:
    """One image's visual tokens as the LLM would see them without pruning."""

    features: torch.Tensor
    """(n, d_lm) projected features, in sequence order."""
    prunable: torch.Tensor
    """(n,) bool; False for tokens that are always kept (LLaVA-NeXT's image_newline tokens)."""
    grid: tuple[int, int]
    """(rows, cols) of the main token grid (LLaVA: 24x24; Qwen: merged h/2 x w/2; LLaVA-NeXT:
    the base/thumbnail view)."""
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    view: torch.Tensor | None = None
    """(n,) long, LLaVA-NeXT only: 0 = base/thumbnail view, 1 = the stitched, unpadded crop grid,
    -1 = image_newline token."""
    crop: torch.Tensor | None = None
    """(n,) long, LLaVA-NeXT only: which AnyRes crop (row-major in ``crop_grid``) a view-1 token
    comes from; -1 for base and newline tokens."""
    coords: torch.Tensor | None = None
    """(n, 2) long, LLaVA-NeXT only: (row, col) of each token inside its view's grid; -1 for newlines."""
    view_shape: list[tuple[int, int]] | None = None
    """LLaVA-NeXT only: (rows, cols) of view 0 and of view 1 (after unpadding)."""
    crop_grid: tuple[int, int] | None = None
    """LLaVA-NeXT only: (gh, gw), the AnyRes crop grid."""
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    """LLaVA family: the multimodal projector, (m, c_vision) -> (m, d_lm), so that a merger can
    average ``signals[VISION_FEATURES]`` and project afterwards (AIM). None where the features
    merged are the LLM's own input (Qwen: the patch merger is part of the vision tower)."""

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_prunable(self) -> int:
        return int(self.prunable.sum())

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Prunable tokens per view: LLaVA-NeXT's thumbnail, then each crop (row-major, 0 for an
        all-padding crop); one view otherwise (the budget unit of :func:`vlmprune.policy.view_kept_counts`)."""
        if self.view is None or self.crop is None or self.crop_grid is None:
            return (self.n_prunable,)
        view_of = self.view_key()
        return tuple(int((view_of == v).sum()) for v in range(1 + self.crop_grid[0] * self.crop_grid[1]))

    def view_key(self) -> torch.Tensor:
        """(n,) long: each token's view in :attr:`view_sizes` order (0 = thumbnail, 1 + k = crop k);
        -1 for always-kept tokens."""
        if self.view is None or self.crop is None:
            return torch.where(self.prunable.bool(), 0, -1)
        return torch.where(self.view == 1, self.crop + 1, self.view)


@dataclass
class Sequence:
    """One request's full LLM input, before or after pre-LLM pruning."""

    embeds: torch.Tensor
    """(L, d) input embeddings."""
    positions: torch.Tensor
    """(L,) 1-D positions (LLaVA) or (3, L) M-RoPE positions (Qwen)."""
    input_ids: torch.Tensor
    """(L,) token ids; image placeholders keep the image token id."""
    image_spans: list[torch.Tensor]
    """Per image, (n_i,) sequence indices of its visual tokens, ascending."""
    instruction_index: torch.Tensor
    """(t,) sequence indices of the instruction: the text after the last image (to the end)."""

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0])


class ModelAdapter(ABC):
    """Family-specific glue between a transformers VLM and the generic reference pipeline.

    An adapter only *gathers*: it runs the vision tower (with the hooks the requested signals
    need) and lays out the unpruned LLM input exactly as the stock model would. It never prunes.
    """

    family: ClassVar[str]
    reindex_after_pruning: ClassVar[bool]
    """True (LLaVA family): after pre-LLM pruning positions are contiguous 0..L'-1, as in stock
    LLaVA and in vLLM. False (Qwen family): kept tokens keep their original M-RoPE ids."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor

    @abstractmethod
    def encode_images(self, inputs: Mapping[str, torch.Tensor], needs: frozenset[str]) -> list[ImageTokens]:
        """Every image of the processed batch, in order, with the signals named in ``needs``."""

    @abstractmethod
    def build_sequence(self, inputs: Mapping[str, torch.Tensor], row: int, images: list[ImageTokens]) -> Sequence:
        """Batch row ``row``'s full, unpruned LLM input; ``images`` are that row's images in order.

        The embeddings and positions must equal what the stock model feeds its LLM (bitwise)."""

    @abstractmethod
    def images_per_row(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """How many images each batch row holds."""

    @property
    @abstractmethod
    def text_model(self) -> Any:
        """The decoder stack: has ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``."""

    @property
    @abstractmethod
    def lm_head(self) -> torch.nn.Module:
        """Hidden state -> vocabulary logits."""

    def next_positions(self, positions: torch.Tensor, count: int) -> torch.Tensor:
        """Positions of ``count`` tokens appended after a sequence whose positions are ``positions``
        ((L,) or (3, L)): one past the largest id, increasing; the same on every M-RoPE axis."""
        start = int(positions.max()) + 1 if positions.numel() else 0
        new = torch.arange(start, start + count, device=positions.device)
        return new if positions.ndim == 1 else new.unsqueeze(0).expand(positions.shape[0], -1)
