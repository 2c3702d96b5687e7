"""TransPrune: token transition variation (TTV) + instruction-guided attention (IGA).

Paper: "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model",
arXiv 2507.20630. Reference implementation: the authors' official repository (commit c9e8284).

TTV measures how much a sub-block (attention or FFN) changes a token: magnitude ratio times a
softmax-normalised direction change. It is accumulated over the early layers, combined with the
instruction rows' attention (:func:`vlmprune.signals.instruction_attention`) and the top ``keep``
visual tokens survive, in raster order. ``keep`` comes from the schedule's
:func:`vlmprune.core.schedule.stage_counts`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmprune.core.select import topk_sorted

_DIRECTIONS = ("one_minus_cos", "one_minus_abs_cos")


def transition_variation(x_in: torch.Tensor, x_out: torch.Tensor, direction: str = "one_minus_cos") -> torch.Tensor:
    """TTV of one sub-block over all L positions, (L,).

    ``x_in`` (L, C): the normed sub-block input; ``x_out`` (L, C): its output before the residual
    add. m = ||out|| / ||in||; d = softmax over positions of (1 - cos) (released code) or
    (1 - |cos|) (paper); TTV = m * d.
    """
    if x_in.ndim != 2 or x_in.shape != x_out.shape:
        raise ValueError(f"x_in and x_out must both be (L, C), got {tuple(x_in.shape)} and {tuple(x_out.shape)}")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    a, b = x_in.float(), x_out.float()
    magnitude = b.norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)  # (L,)
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)  # (L,)
    change = 1.0 - (cos.abs() if direction == "one_minus_abs_cos" else cos)
    return magnitude * torch.softmax(change, dim=0)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    total = x.sum()
    return x / total if float(total) > 0 else torch.zeros_like(x)


def combine(ttv: torch.Tensor | None, iga: torch.Tensor) -> torch.Tensor:
    """TransPrune score over the visual tokens (n,): TTV and IGA each normalised to sum 1, summed.

    ``ttv`` None or all zero (a stage at the LLM input, before any TTV was recorded): IGA alone.
    """
    score = _normalised(iga)
    if ttv is None:
        return score
    if ttv.shape != iga.shape:
        raise ValueError(f"ttv and iga disagree in shape: {tuple(ttv.shape)} vs {tuple(iga.shape)}")
    return score + _normalised(ttv)


def reduce(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest-scoring visual tokens, ascending."""
    return topk_sorted(scores, keep)
