"""Explainability-guided compression: a small CNN predicts each visual token's relevance.

Paper: "Generic Token Compression in Multimodal Large Language Models from an Explainability
Perspective", arXiv 2506.01097 (v2: "Task-Related Token Compression ..."). No official code; the
architecture follows the paper's description (5-layer 1-D depthwise-separable CNN, 32 -> 512
channels, softmax over tokens, KL to top-50 % relevance labels).

Input: the layer-0 attention from the instruction rows to the visual tokens
(:func:`vlmprune.signals.instruction_attention` restricted to the visual columns), (N,) or (B, N).
The paper's CNN is 1-D over the flat token sequence and fully convolutional, so it runs on any N.
The attention is really a map over the image's patch grid: with ``RelevanceCNNConfig.grid`` the
same blocks are 2-D convolutions over that grid (N must then be rows x cols: single-view models
such as LLaVA-1.5), so neighbours above and below a patch are as close as those beside it.
``keep`` for :func:`reduce` comes from :func:`vlmprune.policy.kept_count`.

Training labels: :func:`teacher_target` + :func:`kl_loss` (the paper's); :func:`rank_target` and
:func:`pairwise_loss` are ranking alternatives over several keep fractions (``--loss``). The
network and its checkpoint are the same whichever loss trained it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.core.select import topk_sorted
from vlmprune.policy import kept_count

CHECKPOINT_NAME = "vlmprune_explain_cnn.pt"
"""File name of a model's relevance-CNN weights when shipped beside the model (both backends look there)."""

_EPS = 1e-8


@dataclass(frozen=True)
class RelevanceCNNConfig:
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    """Output channels of the depthwise-separable layers (one layer per entry)."""
    kernel_size: int = 5
    """Depthwise kernel width (odd, so the sequence length is preserved)."""
    grid: tuple[int, int] | None = None
    """None: 1-D convolutions over the flat token sequence (the paper's shape, any N).
    ``(rows, cols)``: 2-D convolutions over the image's patch grid (N must be rows * cols)."""

    def __post_init__(self) -> None:
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.kernel_size <= 0 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"grid must be (rows, cols) of positive ints or None, got {self.grid}")


class _ChannelNorm(nn.Module):
    """LayerNorm over channels at each position: independent of N and of train/eval mode."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, *spatial)
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class _SeparableBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, dims: int = 1) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.depthwise = conv(c_in, c_in, kernel_size, padding=kernel_size // 2, groups=c_in)
        self.pointwise = conv(c_in, c_out, 1)
        self.norm = _ChannelNorm(c_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, *spatial) -> (B, C_out, *spatial)
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class RelevanceCNN(nn.Module):
    """Attention vector (B, N) -> log-probabilities over tokens (B, N).

    One depthwise-separable block per ``config.channels`` entry (depthwise conv of width
    ``kernel_size``, pointwise conv, LayerNorm over channels, GELU), then a 1x1 conv to one channel
    gives per-token logits; log_softmax over N. 1-D over the sequence (any N), or 2-D over
    ``config.grid`` (N = rows * cols, raster order).

    Input preprocessing: log(attn + 1e-8), then standardised per sample over its valid tokens, so
    the network sees relative attention and is insensitive to the sequence-length-dependent scale
    of softmax attention. Padding positions (``mask`` False) get -inf logits.
    """

    def __init__(self, config: RelevanceCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or RelevanceCNNConfig()
        blocks, c_in = [], 1
        dims = 1 if self.config.grid is None else 2
        for c_out in self.config.channels:
            blocks.append(_SeparableBlock(c_in, c_out, self.config.kernel_size, dims))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, 1, 1)

    def forward(self, attn: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn`` (B, N) >= 0; optional ``mask`` (B, N) bool of valid tokens (right-padded batches)."""
        if attn.ndim != 2:
            raise ValueError(f"attn must be (B, N), got {tuple(attn.shape)}")
        mask = torch.ones_like(attn, dtype=torch.bool) if mask is None else mask.bool()
        param = self.head.weight
        x = torch.log(attn.to(param.dtype).clamp_min(0) + _EPS)  # (B, N)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1)
        mean = (x * mask).sum(dim=1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(dim=1, keepdim=True) / count
        x = ((x - mean) / (var + 1e-6).sqrt()) * mask  # (B, N), padding at 0
        b, n = x.shape
        shape = (n,) if self.config.grid is None else tuple(self.config.grid)
        if self.config.grid is not None and (shape[0] * shape[1] != n or not bool(mask.all())):
            raise ValueError(f"a grid CNN scores exactly {shape[0]}x{shape[1]} tokens, got {n} (or padding)")
        h = x.reshape(b, 1, *shape)  # (B, 1, N) or (B, 1, rows, cols)
        keep = mask.reshape(b, 1, *shape).to(h.dtype)
        for block in self.blocks:
            # Re-zero padding after every block, so a padded row equals the unpadded sample
            # (the convolutions then see the same zeros as their own zero padding).
            h = block(h) * keep
        logits = self.head(h).reshape(b, n)  # (B, N)
        logits = logits.masked_fill(~mask, float("-inf"))
        return F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def relevance(self, attn: torch.Tensor) -> torch.Tensor:
        """Predicted relevance distribution over one image's tokens: (N,) -> (N,), sums to 1."""
        if attn.ndim != 1:
            raise ValueError(f"attn must be (N,), got {tuple(attn.shape)}")
        was_training = self.training
        self.eval()
        try:
            return self(attn[None]).exp()[0]
        finally:
            self.train(was_training)

    def save(self, path: str | Path) -> None:
        """One file: config and weights, loadable with ``weights_only=True``."""
        cfg = asdict(self.config)
        cfg["channels"] = list(cfg["channels"])
        if cfg["grid"] is not None:
            cfg["grid"] = list(cfg["grid"])
        torch.save({"config": cfg, "state_dict": self.state_dict()}, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "RelevanceCNN":
        blob = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
            raise ValueError(f"{path} is not a RelevanceCNN checkpoint (expected keys 'config', 'state_dict')")
        cfg = dict(blob["config"])
        cfg["channels"] = tuple(cfg["channels"])
        if cfg.get("grid") is not None:
            cfg["grid"] = tuple(cfg["grid"])
        model = cls(RelevanceCNNConfig(**cfg))
        model.load_state_dict(blob["state_dict"])
        return model


def teacher_target(relevance: torch.Tensor, keep_fraction: float = 0.5) -> torch.Tensor:
    """Training label: the top ``keep_fraction`` of the relevance, renormalised; the rest zero.

    ``relevance`` (N,) or (B, N), negative values clamped to 0. A row with no positive kept mass
    becomes uniform over its kept tokens.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    rel = relevance.float().clamp_min(0)
    flat = rel.reshape(-1, rel.shape[-1])  # (B, N)
    k = kept_count(flat.shape[-1], 1.0 - keep_fraction)
    idx = topk_sorted(flat, k)  # (B, k)
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
    target = torch.where(kept, flat, torch.zeros_like(flat))
    total = target.sum(dim=1, keepdim=True)
    uniform = kept.float() / max(k, 1)
    target = torch.where(total > 0, target / total.clamp_min(1e-30), uniform)
    return target.reshape(rel.shape)


def kl_loss(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target || prediction), summed over tokens, mean over the batch; ``log_probs`` (B, N)."""
    if log_probs.shape != target.shape:
        raise ValueError(f"log_probs and target disagree in shape: {tuple(log_probs.shape)} vs {tuple(target.shape)}")
    # Padding positions carry -inf log-probs and zero target; xlogy keeps them at 0.
    lp = log_probs.float().masked_fill(target == 0, 0.0)
    per_sample = (torch.xlogy(target.float(), target.float()) - target.float() * lp).sum(dim=-1)
    return per_sample.mean()


RANK_CUTS = (0.5, 0.25, 0.1, 0.05)
"""Keep fractions the ranking labels care about: the explain method keeps the top ``1 - ratio``,
so a student must order the teacher's tokens at every such cut, not only at 50 %."""


def rank_levels(relevance: torch.Tensor, cuts: tuple[float, ...] = RANK_CUTS) -> torch.Tensor:
    """Per token, how many of ``cuts`` keep it in the teacher's top fraction: (N,) or (B, N) float
    in ``0..len(cuts)``. Depends only on the teacher's order, not on its (peaked) mass."""
    if not cuts or any(not 0.0 < c <= 1.0 for c in cuts):
        raise ValueError(f"cuts must be fractions in (0, 1], got {cuts}")
    rel = relevance.float()
    flat = rel.reshape(-1, rel.shape[-1])
    levels = torch.zeros_like(flat)
    for cut in cuts:
        idx = topk_sorted(flat, kept_count(flat.shape[-1], 1.0 - cut))
        levels += torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return levels.reshape(rel.shape)


def rank_target(relevance: torch.Tensor, cuts: tuple[float, ...] = RANK_CUTS) -> torch.Tensor:
    """A rank-based training label: the mean over ``cuts`` of the uniform distribution on the
    teacher's top ``cut`` tokens (a staircase over the teacher's order), for :func:`kl_loss`.

    :func:`teacher_target` weights tokens by the teacher's mass, most of which sits on a few tokens,
    so the KL barely cares how the rest of the top half is ordered; this label gives every cut the
    same weight."""
    rel = relevance.float()
    flat = rel.reshape(-1, rel.shape[-1])
    target = torch.zeros_like(flat)
    for cut in cuts:
        k = kept_count(flat.shape[-1], 1.0 - cut)
        target += torch.zeros_like(flat).scatter_(1, topk_sorted(flat, k), 1.0 / k)
    return (target / len(cuts)).reshape(rel.shape)


def pairwise_loss(log_probs: torch.Tensor, levels: torch.Tensor, pairs: int = 256,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Logistic ranking loss: for each cut, ``pairs`` random (kept, dropped) token pairs per row
    and ``softplus(s_dropped - s_kept)``; mean over rows, cuts and pairs.

    ``log_probs`` (B, N) (padding -inf); ``levels`` (B, N) from :func:`rank_levels`, padding < 0.
    A pair is (token inside cut c, valid token outside it), for c = 1..max level; sampling bounds
    the cost at any N."""
    if log_probs.shape != levels.shape:
        raise ValueError(f"log_probs and levels disagree in shape: {tuple(log_probs.shape)} vs {tuple(levels.shape)}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    valid = levels >= 0
    scores = log_probs.float().masked_fill(~valid, 0.0)
    losses = []
    for c in range(1, int(levels.max().item()) + 1):
        pos, neg = levels >= c, valid & (levels < c)
        rows = pos.any(1) & neg.any(1)
        if not bool(rows.any()):
            continue
        i = torch.multinomial(pos[rows].float(), pairs, replacement=True, generator=generator)  # (B', pairs)
        j = torch.multinomial(neg[rows].float(), pairs, replacement=True, generator=generator)
        s = scores[rows]
        losses.append(F.softplus(s.gather(1, j) - s.gather(1, i)).mean())
    if not losses:
        return scores.sum() * 0.0
    return torch.stack(losses).mean()


def reduce(relevance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` most relevant tokens, ascending."""
    return topk_sorted(relevance, keep)
