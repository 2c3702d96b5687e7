"""FastV: keep the visual tokens the prompt's last token attends to most, after layer K.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", Chen et al., ECCV 2024 (arXiv 2403.06764). Reference implementation:
github.com/pkunlp-icler/FastV, ``modeling_llama.py`` (the ``fast_v_inplace`` branch, commit eca14d6).

Algorithm (official defaults K = 2, R = 50 %): layers ``< K`` see every token; at layer ``K`` the
image tokens are ranked by the attention the *last* token of the prompt pays them in layer ``K-1``
(softmax probabilities, mean over heads), the top ones are kept and layers ``>= K`` run on the kept
tokens only, with their original position ids. ``query="instruction"`` (an option, not the paper)
averages the instruction rows (all text after the image) instead of taking the last row alone.

How many are kept: :func:`vlmprune.core.schedule.fastv_stages` (``ratio`` is layer-averaged, as for
the other in-LLM methods). Deviations from the official code: ``vlmprune/core/FIDELITY.md``.

Shapes: ``H`` query heads, ``t`` query rows, ``L`` keys (the sequence as layer ``K-1`` sees it).
"""

from __future__ import annotations

from typing import Literal

import torch

from vlmprune.core.select import topk_sorted

Query = Literal["last", "instruction"]
QUERIES: tuple[str, ...] = ("last", "instruction")


def query_rows(query: str, length: int, instruction_index: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence rows whose attention scores the image: ``(1,)`` the last row, or the instruction's ``(t,)``.

    ``length``: the sequence length at the scoring layer (the last prompt token is row ``length-1``);
    ``instruction_index`` (t,): ascending instruction rows (needed for ``query="instruction"``).
    """
    if query not in QUERIES:
        raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if query == "last":
        return torch.tensor([length - 1], dtype=torch.long)
    if instruction_index is None or instruction_index.ndim != 1 or instruction_index.numel() == 0:
        raise ValueError("query='instruction' needs a non-empty 1-D instruction_index (text after the image)")
    rows = instruction_index.long()
    if int(rows.min()) < 0 or int(rows.max()) >= length:
        raise ValueError(f"instruction_index must lie in [0, {length}), got [{int(rows.min())}, {int(rows.max())}]")
    return rows


def attention_scores(attention: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
    """Attention each key receives from the query rows, mean over heads and rows; (L,) fp32.

    ``attention`` (H, t, L): probabilities of ``t`` query rows over ``L`` keys (rows sum to 1 over
    their visible keys), or pre-softmax scaled logits with ``logits=True`` (masked keys ``-inf``);
    softmax then runs per head and row before the mean, as the official code reads the eager
    attention weights. A (t, L) or (L,) input is one head (and one row).
    """
    if attention.ndim == 1:
        attention = attention[None, None]
    elif attention.ndim == 2:
        attention = attention[None]
    if attention.ndim != 3 or attention.shape[-1] == 0:
        raise ValueError(f"attention must be (H, t, L) with L > 0, got {tuple(attention.shape)}")
    probs = attention.float()
    if logits:
        probs = probs.softmax(dim=-1)
    return probs.mean(dim=(0, 1))


def select(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring image tokens, ascending (ties: the lower index).

    ``scores`` (n,): :func:`attention_scores` at one image's token columns. The official code uses
    ``topk`` (order among equal scores unspecified); here ties break deterministically.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be (n,), got {tuple(scores.shape)}")
    return topk_sorted(scores, keep)
