"""A small CLIP-architecture ViT pretrained on the scene task, so its [CLS] attention means something.

CLIP's [CLS] token learns to attend to the objects of an image because its contrastive objective is
about what the image shows; FasterVLM relies on that. Here the same happens on a small scale: the
ViT (a transformers ``CLIPVisionModel``, so LLaVA and vLLM load it unchanged) is trained through its
pooled [CLS] output on scene-level targets (which colour+shape pairs are present, which digits and
box colours, how many shapes of each colour), which can only be met by attending to the objects.

An auxiliary dense head on the *penultimate* layer's patch tokens (the features LLaVA feeds its
projector, ``vision_feature_layer=-2``) predicts each patch's colour, kind, digit and size; it plays
the part of CLIP's locally informative patch features, which a ViT this small would not learn from
scene-level targets in CPU-minutes. The heads are discarded after pretraining.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmprune.testbed import scenes

PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class VitConfig:
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_size: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def clip_config(cfg: VitConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        projection_dim=cfg.hidden_size,
        hidden_act="quick_gelu",
    )


def image_processor(cfg: VitConfig):
    """CLIP preprocessing at the ViT's resolution (the scenes are rendered at exactly that size)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=PIXEL_MEAN,
        image_std=PIXEL_STD,
    )


def pixels(images, cfg: VitConfig) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels, identical to CLIP preprocessing of an S x S image (no resize,
    no crop), without the processor's per-call overhead."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0  # (B, S, S, 3)
    if arr.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"images must be {cfg.image_size}x{cfg.image_size}, got {arr.shape[1:3]}")
    arr = (arr - np.asarray(PIXEL_MEAN, np.float32)) / np.asarray(PIXEL_STD, np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


N_COLOURS = len(scenes.COLOURS)
N_MULTI = N_COLOURS * len(scenes.SHAPES) + len(scenes.DIGITS) + N_COLOURS
DENSE = {
    "colour": N_COLOURS + 1,
    "kind": len(scenes.PATCH_KINDS) + 1,
    "digit": len(scenes.DIGITS) + 1,
    "size": 3,
    "count": len(scenes.NUMBER_WORDS),
    "row": VitConfig().grid + 1,
    "col": VitConfig().grid + 1,
}
"""Per-patch classes (0 = background). ``count`` (shapes of this patch's colour) is scene context a
patch can only get by attending to the others; it lets a reader of one object's tokens count.
``row``/``col`` (the patch's own grid position + 1) keep position LINEARLY readable in the
features: the LLM sees visual tokens in 1-D raster order (RoPE), so "left of" has to come from
the features, and without this head the column was not linearly decodable from them at all
(least-squares R^2 < 0 on val patches; the LM stayed at chance on position questions)."""


class PretrainHeads(nn.Module):
    """[CLS] heads (multi-hot presence, per-colour count 0..4) and dense per-patch heads."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.multi = nn.Linear(d, N_MULTI)
        self.counts = nn.Linear(d, N_COLOURS * 5)
        self.dense = nn.Linear(d, sum(DENSE.values()))

    def loss(self, out, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pooled = out.pooler_output  # (B, d), post-layernorm [CLS] of the last layer
        patches = out.hidden_states[-2][:, 1:]  # (B, P, d), what LLaVA's projector sees
        l_multi = nn.functional.binary_cross_entropy_with_logits(self.multi(pooled), batch["multi"])
        counts = self.counts(pooled).view(-1, N_COLOURS, 5)
        l_count = nn.functional.cross_entropy(counts.reshape(-1, 5), batch["counts"].reshape(-1))
        dense = self.dense(patches)  # (B, P, sum)
        l_dense, start, parts = 0.0, 0, {}
        for name, k in DENSE.items():
            logits = dense[..., start : start + k].reshape(-1, k)
            target = batch[name].reshape(-1)
            l_dense = l_dense + DENSE_WEIGHT[name] * object_weighted_ce(logits, target)
            on_object = target > 0
            if on_object.any():
                parts[f"{name}_acc"] = (logits[on_object].argmax(-1) == target[on_object]).float().mean().item()
            start += k
        total = l_multi * 4 + l_count + l_dense
        return total, {"multi": l_multi.item(), "count": l_count.item(), "dense": float(l_dense.item()), **parts}


DENSE_WEIGHT = {"colour": 1.0, "kind": 2.0, "digit": 3.0, "size": 1.0, "count": 1.0, "row": 0.5, "col": 0.5}
"""Shape and digit identity are the hard per-patch read-outs (they need context from neighbouring
patches); colour is nearly a per-pixel property."""


def object_weighted_ce(logits: torch.Tensor, target: torch.Tensor, background_weight: float = 0.1) -> torch.Tensor:
    """Cross-entropy where background patches (label 0, ~85 % of a scene) count ``background_weight``:
    an unweighted mean lets the head score well by answering "background" and never learn the
    small objects the questions are about."""
    weight = torch.where(target > 0, 1.0, background_weight)
    ce = nn.functional.cross_entropy(logits, target, reduction="none")
    return (weight * ce).sum() / weight.sum()


def sincos_2d(grid: int, dim: int, scale: float = 0.5) -> torch.Tensor:
    """(1 + grid^2, dim) 2-D sine-cosine position table ([CLS] row zero), the position embeddings' init.

    With a random init a ViT this small spends most of a CPU budget learning which patches are
    neighbours (measured: per-object shape accuracy stayed ~50 % for 450 steps, while the local
    digit read-out climbed); a 2-D sin-cos start gives it locality at step 0 (MAE's choice too)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = [torch.outer(axis.flatten(), freqs) for axis in (ys, xs)]
    table = torch.cat([f(a) for a in parts for f in (torch.sin, torch.cos)], dim=1)  # (grid^2, dim)
    return scale * torch.cat([torch.zeros(1, dim), table])


def scene_batch(seeds: list[int], cfg: VitConfig) -> dict[str, torch.Tensor]:
    """Pixels and every pretraining target for the scenes of ``seeds``."""
    scs = [scenes.make_scene(s) for s in seeds]
    batch = {"pixel_values": pixels([scenes.render(s, cfg.image_size) for s in scs], cfg)}
    targets = [scenes.scene_targets(s) for s in scs]
    batch["multi"] = torch.from_numpy(np.stack([t["multi"] for t in targets]))
    batch["counts"] = torch.from_numpy(np.stack([t["counts"] for t in targets]))
    labels = [scenes.patch_labels(s, cfg.image_size, cfg.patch_size) for s in scs]
    for name in DENSE:
        batch[name] = torch.from_numpy(np.stack([lab[name] for lab in labels]))
    return batch


def pretrain(
    out_dir: Path,
    cfg: VitConfig = VitConfig(),
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
    progress: bool = True,
):
    """Pretrain the ViT on train-split scenes; resumable from ``out_dir/vit_ckpt.pt``.

    Scene seeds of step ``t`` are fixed by (seed, t), so a resumed run sees the same data."""
    from tqdm import tqdm
    from transformers import CLIPVisionModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "vit_final.pt"
    torch.manual_seed(seed)
    model = CLIPVisionModel(clip_config(cfg))
    with torch.no_grad():
        model.embeddings.position_embedding.weight.copy_(sincos_2d(cfg.grid, cfg.hidden_size))
    heads = PretrainHeads(cfg.hidden_size)
    if final.is_file():
        model.load_state_dict(torch.load(final, map_location="cpu"))
        log(f"vit: loaded finished pretraining from {final}")
        return model.eval()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: float(min(1.0, (t + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, t / steps))))
    )
    ckpt = out_dir / "vit_ckpt.pt"
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # our own checkpoint
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log(f"vit: resumed at step {start}")
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc="vit pretrain", disable=not progress, initial=start, total=steps)
    for step in bar:
        rng = random.Random(seed * 1_000_003 + step)
        seeds = [rng.randrange(scenes.SPLIT_SIZE) + scenes.SPLITS["train"] for _ in range(batch_size)]
        batch = scene_batch(seeds, cfg)
        out = model(pixel_values=batch["pixel_values"], output_hidden_states=True)
        loss, parts = heads.loss(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in parts.items()})
        if (step + 1) % 50 == 0 or step + 1 == steps:
            torch.save(
                {"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "step": step + 1},
                ckpt,
            )
            log(f"vit step {step + 1}/{steps} loss {loss.item():.4f} {parts} ({time.time() - t0:.0f} s)")
    torch.save(model.state_dict(), final)
    (out_dir / "vit_config.json").write_text(json.dumps(asdict(cfg)))
    return model.eval()
