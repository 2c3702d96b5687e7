"""Shared data types of the transformers reference backend.

A model adapter (one per family: llava, llava_next, qwen2_vl, qwen2_5_vl) turns processor outputs
into :class:`~vlmprune.reduction.image_tokens.ImageTokens` (projected features + the signals the
pruners need, in the order the LLM sees them; the type both backends share) and a full, unpruned
:class:`Sequence`; everything after that (pruning, the LLM forward, decoding) is generic and lives
in ``pipeline.py`` / ``progressive.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vlmprune.reduction.image_tokens import ImageTokens


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
