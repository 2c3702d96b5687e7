"""Shared selection primitives: sorted top-k, exact budget allocation, the reduction result type.

Every pruner returns a :class:`TokenReduction`; the backends apply it. Pruners never edit the
caller's hidden states, positions or masks in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenReduction:
    """What a pruner decided for one image's visual tokens.

    ``index`` (k,) are positions in the image's token sequence, ascending (raster order). For a
    pruner, the kept features are ``features_in[index]``. For a merger, ``features`` (k, C) holds
    the merged values and ``index`` the token each merged value stands in for (its position ids
    are used).
    """

    index: torch.Tensor
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.index.ndim != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(self.index.shape)}")
        if self.features is not None and self.features.shape[0] != self.index.shape[0]:
            raise ValueError("merged features and index disagree in length")

    @property
    def count(self) -> int:
        return int(self.index.shape[0])

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Kept (or merged) features, (k, C), given the image's full features (n, C)."""
        return self.features if self.features is not None else features[self.index]

    @staticmethod
    def identity(n: int, device: torch.device | str | None = None) -> "TokenReduction":
        return TokenReduction(index=torch.arange(n, device=device))


class NonFiniteScoresError(ValueError):
    """A scorer produced NaN: any selection from it would be arbitrary (an overflowing model, a
    degenerate input). The serving path catches it and uses its documented fallback."""


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, sorted ascending (raster order).

    Works on (N,) or batched (B, N) scores. Ties break toward the lower index, deterministically.
    NaN scores raise :class:`NonFiniteScoresError` (a sort would place them arbitrarily).
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} tokens")
    if k == n:
        return torch.arange(n, device=scores.device).expand(scores.shape[:-1] + (n,)).clone()
    if bool(torch.isnan(scores).any()):
        raise NonFiniteScoresError(f"{int(torch.isnan(scores).sum())} of {scores.numel()} scores are NaN")
    # A stable descending sort makes ties deterministic (lower index first), unlike topk.
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def allocate_exact(total: int, weights: torch.Tensor, capacity: torch.Tensor | None = None) -> torch.Tensor:
    """Split an integer ``total`` into per-group integer budgets proportional to ``weights``.

    Largest-remainder rounding, so the budgets sum to ``total`` exactly; no group gets more than
    its ``capacity`` (the overflow is redistributed to groups with room). ``weights`` >= 0.
    """
    weights = weights.double().clamp_min(0)
    g = weights.shape[0]
    cap = (
        torch.full((g,), total, dtype=torch.long)
        if capacity is None
        else capacity.long().cpu()
    )
    if total > int(cap.sum()):
        raise ValueError(f"cannot place {total} tokens in groups holding {int(cap.sum())}")
    budget = torch.zeros(g, dtype=torch.long)
    remaining = total
    free = cap > 0
    while remaining > 0:
        w = torch.where(free, weights.cpu(), torch.zeros_like(weights.cpu()))
        if float(w.sum()) <= 0:
            w = free.double()  # nothing left to weigh by: spread evenly over groups with room
        share = w / w.sum() * remaining
        base = torch.minimum(share.floor().long(), cap - budget)
        budget += base
        left = remaining - int(base.sum())
        if left > 0:
            frac = torch.where(free & (budget < cap), share - share.floor(), torch.full_like(share, -1.0))
            order = torch.sort(frac, descending=True, stable=True).indices
            for i in order.tolist():
                if left == 0:
                    break
                if budget[i] < cap[i]:
                    budget[i] += 1
                    left -= 1
        remaining = total - int(budget.sum())
        free = budget < cap
    return budget
