"""Training of ``demo-next`` (LLaVA-NeXT style, AnyRes): ``vlmprune train demo-next [--base demo]``.

LLaVA-NeXT was grown from LLaVA-1.5 (same vision tower, projector and LM family, plus AnyRes and the
``image_newline`` token), and so is ``demo-next``: it starts from a trained ``demo`` (``--base``)
and fine-tunes its projector, LM and the new newline embedding on AnyRes sequences, with the same
frozen ViT. Its scenes are the task's scenes at ``scale = 0.5`` on a 448 px canvas
(:func:`vlmprune.testbed.scenes.render_layout`): the stock processor gives a 224 px thumbnail plus
2 x 2 crops of 224 px, so an object in a crop looks exactly like a ``demo`` object, while in the
thumbnail it is half that size and digits are unreadable. The LM sees 256 thumbnail tokens + 32 x 32
crop tokens + 32 newlines = 1312 visual tokens per image.

Stages (resumable, in ``OUT.work``): 1. per-view ViT features of a fixed pool of train scenes and of
the val scenes are cached (fp16); 2. the LM stage of :func:`vlmprune.testbed.lm_stage.train_lm` (the
three supervised attention hops and token dropout of ``demo``) with the features packed by the
model's own ``pack_image_features``, so training and inference lay tokens out identically;
3. the model is written in the hub layout transformers and vLLM load. ``--device cuda`` runs stages
1-2 on a GPU.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmprune.testbed import scenes
from vlmprune.testbed.lm_stage import LmStageConfig, question_batch, train_lm
from vlmprune.testbed.registry import resolve_model, scene_layout
from vlmprune.testbed.run_folder import prepare_run, resumable_cache, save_hub_layout


@dataclass(frozen=True)
class NextConfig(LmStageConfig):
    """Every knob of the ``demo-next`` recipe (recorded in the output folder); the LM-stage knobs
    are ``demo``'s, with a smaller scene pool and batch and a fine-tuning learning rate."""

    base: str = "demo"
    """The trained LLaVA-1.5-style model it starts from (a shipped name or a folder)."""
    pinpoints: tuple[tuple[int, int], ...] = ((224, 448), (448, 224), (448, 448))
    max_positions: int = 2048
    cache_scenes: int = 2000
    steps: int = 1500
    batch: int = 8
    lr: float = 5e-4
    val_samples: int = 200


# --- model ------------------------------------------------------------------------------------------


def build_next(base_dir: Path, cfg: NextConfig):
    """(LlavaNextForConditionalGeneration, LlavaNextProcessor) carrying ``base_dir``'s ViT, projector,
    LM, tokenizer and chat template; only ``image_newline`` is new (LLaVA-NeXT's init)."""
    from transformers import (
        AutoProcessor,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    base = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    base_proc = AutoProcessor.from_pretrained(base_dir)
    vc = base.config.vision_config
    view = int(vc.image_size)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": view},
        crop_size={"height": view, "width": view},
        image_grid_pinpoints=[list(p) for p in cfg.pinpoints],
        image_mean=base_proc.image_processor.image_mean,
        image_std=base_proc.image_processor.image_std,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=base_proc.tokenizer,
        patch_size=int(vc.patch_size),
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=base_proc.chat_template,
    )
    text = base.config.text_config
    text.max_position_embeddings = cfg.max_positions
    config = LlavaNextConfig(
        vision_config=vc,
        text_config=text,
        image_token_id=base.config.image_token_id,
        image_grid_pinpoints=[list(p) for p in cfg.pinpoints],
        vision_feature_layer=base.config.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act=base.config.projector_hidden_act,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if set(missing) != {"model.image_newline"} or unexpected:
        raise ValueError(f"base {base_dir} does not map onto LLaVA-NeXT: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # LLaVA-NeXT's own init of the newline embedding
        d = text.hidden_size
        model.model.image_newline.copy_(torch.randn(d) / d**0.5)
    return model, processor


# --- features and layout ----------------------------------------------------------------------------


def view_owner_maps(scene, view: int, patch: int, canvas: int) -> np.ndarray:
    """(1 + crops, P) item index + 1 (0 background) per patch of each AnyRes view: the thumbnail,
    then the crops in the processor's row-major order."""
    side = view // patch
    grid = canvas // view
    full = scenes.patch_owner(scene, canvas, patch).reshape(grid * side, grid * side)
    crops = [full[r * side : (r + 1) * side, c * side : (c + 1) * side].reshape(-1)
             for r in range(grid) for c in range(grid)]
    return np.stack([scenes.patch_owner(scene, view, patch), *crops])


def packed_owner(model, views: np.ndarray, canvas: int) -> np.ndarray:
    """(n,) owner of every packed visual token (-1 for a newline): the per-view maps laid out by the
    model's own ``pack_image_features``, exactly as the features are."""
    side = torch.from_numpy(views).double()[..., None]  # (V, P, 1)
    packed, _ = model.model.pack_image_features(
        [side], torch.tensor([[canvas, canvas]]), vision_feature_select_strategy="default",
        image_newline=torch.tensor([-1.0], dtype=torch.float64),
    )
    return packed[0][:, 0].round().long().numpy()


def scene_pixels(image_processor, seeds: list[int], canvas: int, scale: float) -> torch.Tensor:
    """(B, V, 3, h, w) AnyRes pixel values of the scenes ``seeds``, by the model's own processor."""
    images = [scenes.render(scenes.make_scene(s, scale), canvas) for s in seeds]
    return image_processor(images, return_tensors="pt")["pixel_values"]


def _worker_init() -> None:
    torch.set_num_threads(1)


@torch.no_grad()
def view_features(model, pixels: torch.Tensor, device: str) -> torch.Tensor:
    """(B, V, P, c) penultimate ViT features (``default`` strategy) of every AnyRes view of
    ``pixels`` (B, V, 3, h, w)."""
    b, v = pixels.shape[:2]
    out = model.model.vision_tower(pixel_values=pixels.flatten(0, 1).to(device), output_hidden_states=True)
    feats = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    return feats.reshape(b, v, *feats.shape[1:]).half().cpu()


def cache_view_features(model, processor, seeds: list[int], path: Path, device: str, log=print,
                        progress: bool = True, workers: int = 1) -> torch.Tensor:
    """Per-view features of the scenes ``seeds`` (fp16, (N, V, P, c)), computed once, resumable;
    ``workers`` processes render and preprocess (the AnyRes processor costs ~0.2 s per image)."""
    import functools
    import multiprocessing

    canvas, scale = scene_layout(model.config)
    model.model.vision_tower.eval()
    pixels_of = functools.partial(scene_pixels, processor.image_processor, canvas=canvas, scale=scale)

    def encode(batches):
        pool = multiprocessing.get_context("fork").Pool(workers, _worker_init) if workers > 1 else None
        try:
            for pixels in pool.imap(pixels_of, batches) if pool is not None else map(pixels_of, batches):
                yield view_features(model, pixels, device)
        finally:
            if pool is not None:
                pool.terminate()

    return resumable_cache(path, seeds, 32, encode, log, progress)


def project_next(model, feats: torch.Tensor) -> torch.Tensor:
    """(B, V, P, c) cached view features -> (B, n, d) packed visual tokens (projector, then the
    model's own AnyRes packing with ``image_newline``); every image is the square canvas."""
    canvas, _ = scene_layout(model.config)
    b, v, p, _ = feats.shape
    visual = model.model.multi_modal_projector(feats.float().flatten(0, 2)).view(b, v, p, -1)
    sizes = torch.tensor([[canvas, canvas]] * b, device=feats.device)
    packed, _ = model.model.pack_image_features(
        list(visual), sizes, vision_feature_select_strategy="default", image_newline=model.model.image_newline
    )
    return torch.stack(packed)


# --- training ---------------------------------------------------------------------------------------


def train_next(
    out: Path,
    cfg: NextConfig = NextConfig(),
    work: Path | None = None,
    threads: int = 2,
    device: str = "cpu",
    workers: int = 1,
    progress: bool = True,
    log=print,
) -> Path:
    """Train ``demo-next`` from ``cfg.base`` and write it (hub layout) to ``out``; returns ``out``.
    ``workers``: processes that render and preprocess scenes for the feature cache."""
    out, work = prepare_run(out, work, cfg, threads)
    t_start = time.time()
    timings: dict[str, float] = {}

    model, processor = build_next(resolve_model(cfg.base), cfg)
    model.to(device)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    canvas, scale = scene_layout(model.config)
    vc = model.config.vision_config
    log(f"demo-next from {cfg.base}: canvas {canvas} px, object scale {scale}, pinpoints {list(cfg.pinpoints)}")

    # 1. Feature cache.
    t = time.time()
    rng = random.Random(cfg.seed + 17)
    train_seeds = [scenes.SPLITS["train"] + s for s in rng.sample(range(scenes.SPLIT_SIZE), cfg.cache_scenes)]
    val = [scenes.sample("val", i, scale) for i in range(cfg.val_samples)]
    feats = cache_view_features(model, processor, train_seeds, work / "train_features.pt", device, log, progress,
                                workers)
    val_feats = cache_view_features(model, processor, [s.scene.seed for s in val], work / "val_features.pt",
                                    device, log, progress, workers)
    timings["feature_cache_s"] = time.time() - t

    # 2. Projector + newline + LM.
    t = time.time()
    owners: dict[int, np.ndarray] = {}

    def owner_of(i: int, scene) -> np.ndarray:
        if i not in owners:
            owners[i] = packed_owner(model, view_owner_maps(scene, vc.image_size, vc.patch_size, canvas), canvas)
        return owners[i]

    prunable = owner_of(0, scenes.make_scene(train_seeds[0], scale)) >= 0  # newlines are never dropped
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    history = train_lm(
        model, processor.tokenizer, cfg, groups,
        next_batch=lambda r: question_batch(cfg, r, train_seeds, feats, owner_of, scale),
        project=project_next, val=(val_feats, [(s.question, s.answer) for s in val], [s.family for s in val]),
        ckpt=work / "lm_ckpt.pt", log=log, progress=progress, prunable=prunable, device=device,
    )
    timings["lm_train_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start

    # 3. Save (hub layout), with the recipe and timings beside it.
    model.cpu().eval()
    save_hub_layout(model, processor, out)
    (out / "training.json").write_text(json.dumps(
        {"config": asdict(cfg), "timings": timings, "history": history, "threads": threads, "device": device},
        indent=2,
    ))
    log(f"saved demo-next to {out} ({timings})")
    return out
