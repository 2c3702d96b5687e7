"""The ``demo`` recipe: ``vlmprune train demo [--out DIR] [--steps N] [--seed S]``.

``demo`` (LLaVA-1.5 style, transformers ``LlavaForConditionalGeneration``) is trained in three
resumable stages inside ``--out``'s work folder:

1. ViT pretraining (:mod:`vlmprune.testbed.vit`), through [CLS] on scene-level targets plus dense
   per-patch read-outs (colour, shape, digit, size, count, grid position);
2. the frozen ViT's penultimate-layer patch features of a fixed pool of train scenes are cached once
   (the LM stage never runs the ViT again);
3. projector (2-layer MLP) + a small Llama LM from scratch: the LM stage
   (:mod:`vlmprune.testbed.lm_stage`, shared with ``demo-next``): next-token loss on the answer
   tokens only, over multi-turn conversations, plus attention supervision of two hops and a
   read-out of the asked objects' coordinates for position questions
   (:mod:`vlmprune.testbed.grounding`), and token dropout.

This module holds what is ``demo``'s own: its tokenizer, processor and model, the ViT feature cache,
the projector's initialisation (:func:`balance_scales`, :func:`align_init`) and the stages' order.
Run folders and the hub-layout save are :mod:`vlmprune.testbed.run_folder`; the command line is
:mod:`vlmprune.testbed.train_cli`.

The finished model is written in the hub key layout (``vision_tower.vision_model.*``) that both
transformers and vLLM 0.32 load. Everything is seeded; a stage that finds its checkpoint resumes.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmprune.testbed import scenes, tiny
from vlmprune.testbed.lm_stage import LmStageConfig, project_llava, question_batch, train_lm
from vlmprune.testbed.run_folder import prepare_run, resumable_cache, save_hub_layout
from vlmprune.testbed.tiny import CHAT_TEMPLATE, IMAGE_TOKEN
from vlmprune.testbed.vit import VitConfig, clip_config, image_processor, pixels, pretrain


@dataclass(frozen=True)
class LmConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class DemoConfig(LmStageConfig):
    """Every knob of the ``demo`` recipe (recorded in the output folder)."""

    vit: VitConfig = field(default_factory=VitConfig)
    lm: LmConfig = field(default_factory=LmConfig)
    vit_steps: int = 1500
    vit_batch: int = 32
    vit_lr: float = 2e-3
    align_init: bool = True
    aligned_lr_scale: float = 0.1


# --- tokenizer, processor, model --------------------------------------------------------------------


def build_tokenizer(save_dir: Path):
    """Word-level tokenizer over the task's vocabulary (the tiny models' builder, other words)."""
    return tiny.build_tokenizer(save_dir, scenes.VOCAB_WORDS)


def build_processor(work: Path, vit: VitConfig):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(vit),
        tokenizer=build_tokenizer(work / "tokenizer"),
        patch_size=vit.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(cfg: DemoConfig, tokenizer):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.lm.hidden_size,
        intermediate_size=cfg.lm.intermediate_size,
        num_hidden_layers=cfg.lm.num_layers,
        num_attention_heads=cfg.lm.num_heads,
        num_key_value_heads=cfg.lm.num_kv_heads,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.lm.rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=clip_config(cfg.vit),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(config)


# --- feature cache ----------------------------------------------------------------------------------


@torch.no_grad()
def penultimate_features(vision_tower, images, vit: VitConfig) -> torch.Tensor:
    """(B, P, d) patch features of ``vision_feature_layer=-2`` with the 'default' strategy."""
    out = vision_tower(pixel_values=pixels(images, vit), output_hidden_states=True)
    return out.hidden_states[-2][:, 1:]


def cache_features(vision_tower, seeds: list[int], vit: VitConfig, path: Path, log=print, progress=True) -> torch.Tensor:
    """Penultimate features of the scenes ``seeds`` (fp16, (N, P, d)), computed once, resumable."""
    vision_tower.eval()

    def encode(batches):
        for batch in batches:
            images = [scenes.render(scenes.make_scene(s), vit.image_size) for s in batch]
            yield penultimate_features(vision_tower, images, vit).half()

    return resumable_cache(path, seeds, 64, encode, log, progress, save_every=20)


# --- LM stage: initialisation and run -------------------------------------------------------------


@torch.no_grad()
def balance_scales(model, feats: torch.Tensor, norm: float = 4.0) -> None:
    """Start text embeddings and projected visual tokens at the same norm.

    The penultimate CLIP features are a pre-LayerNorm residual stream (norm ~50 here) while Llama's
    embedding init (std 0.02) gives text tokens norm ~0.2 at d=128: with default inits the visual
    tokens swamp the question in the residual stream and the LM learns the answer prior only.
    Data-dependent init: standardised projector inputs; projected tokens and embeddings both start
    at norm ``norm``."""
    emb = model.get_input_embeddings().weight  # (V, d)
    emb.normal_(0.0, norm / emb.shape[1] ** 0.5)
    proj = model.model.multi_modal_projector
    x = feats.float().reshape(-1, feats.shape[-1])  # (N*P, d_v)
    # Standardise the inputs inside the first layer: the features share a large mean component
    # (norm ~40 against ~18 of per-patch variation), which lets the LM learn early to ignore every
    # visual token alike (a trap it never leaves); centred, per-dimension unit-scale inputs avoid it.
    mu, sigma = x.mean(0), x.std(0).clamp_min(1e-3)  # (d_v,)
    proj.linear_1.weight.div_(sigma)
    proj.linear_1.bias.sub_(proj.linear_1.weight @ mu)
    proj.linear_2.bias.zero_()
    proj.linear_2.weight.mul_(norm / proj(x).norm(dim=-1).mean())


@torch.no_grad()
def align_init(model, tokenizer, dense_head: nn.Linear, norm: float = 4.0, seed: int = 0) -> None:
    """Start the projector and the LM's word vectors aligned (a stand-in for LLaVA's stage-1
    feature-alignment pretraining, which a CPU budget cannot afford).

    The ViT's dense pretraining head reads each patch's colour / kind / digit / size class off the
    penultimate features; the projector's first layer starts as that read-out, its second layer
    maps class c to a random direction ``u_c``, and the words naming class c ("red", "circle", "7",
    "small"; "box") start with embedding ``u_c`` and output row ``u_c / norm``. Everything stays
    trainable; this only shortens the path from "the question names X" to "attend to X's patches"."""
    from vlmprune.testbed.vit import DENSE

    proj = model.model.multi_modal_projector
    d_text = proj.linear_2.out_features
    n_cls = dense_head.out_features
    if n_cls > proj.linear_1.out_features:
        raise ValueError(f"projector too narrow for {n_cls} class read-outs")
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n_cls, d_text, generator=gen)
    u = norm * u / u.norm(dim=1, keepdim=True)  # (C, d) class directions
    proj.linear_1.weight[:n_cls] = dense_head.weight
    proj.linear_1.bias[:n_cls] = dense_head.bias
    proj.linear_2.weight[:, :n_cls] = u.T / 4.0  # a confident logit ~4 -> norm ~ ``norm``
    names = {
        "colour": ["<none>", *scenes.COLOURS],
        "kind": ["<none>", *scenes.PATCH_KINDS],
        "digit": ["<none>", *scenes.DIGITS],
        "size": ["<none>", *scenes.SIZES],
        "count": list(scenes.NUMBER_WORDS),
    }
    start = 0
    emb = model.get_input_embeddings().weight
    for group, k in DENSE.items():
        for c, word in enumerate(names.get(group, ())):  # row/col have no words
            tid = tokenizer.convert_tokens_to_ids(word)
            if c > 0 and tid != tokenizer.unk_token_id:
                emb[tid] = u[start + c]
                model.lm_head.weight[tid] = u[start + c] / norm
        start += k


def param_groups(model, lr: float, aligned_lr_scale: float, freeze_projector: bool = False) -> list[dict]:
    """Trainable parameters; those :func:`align_init` set up (projector, word vectors, output rows)
    learn ``aligned_lr_scale`` times slower, so Adam's early, fixed-size steps
    do not wash their structure out before the rest of the LM has learnt to use it."""
    aligned, rest = [], []
    for name, p in model.named_parameters():
        if freeze_projector and "multi_modal_projector" in name:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        slow = "multi_modal_projector" in name or "embed_tokens" in name or "lm_head" in name
        (aligned if slow else rest).append(p)
    return [{"params": rest, "lr": lr}, {"params": aligned, "lr": lr * aligned_lr_scale}]


def train_demo(
    out: Path,
    cfg: DemoConfig = DemoConfig(),
    work: Path | None = None,
    threads: int = 2,
    progress: bool = True,
    log=print,
) -> Path:
    """Train ``demo`` end to end and write it (hub layout) to ``out``; returns ``out``."""
    out, work = prepare_run(out, work, cfg, threads)
    t_start = time.time()
    timings: dict[str, float] = {}

    # 1. ViT pretraining.
    t = time.time()
    vit_model = pretrain(
        work, cfg.vit, steps=cfg.vit_steps, batch_size=cfg.vit_batch, lr=cfg.vit_lr, seed=cfg.seed,
        log=log, progress=progress,
    )
    timings["vit_pretrain_s"] = time.time() - t

    # 2. Feature cache: a fixed pool of train scenes + the val scenes.
    t = time.time()
    rng = random.Random(cfg.seed + 17)
    train_seeds = [scenes.SPLITS["train"] + s for s in rng.sample(range(scenes.SPLIT_SIZE), cfg.cache_scenes)]
    val = [scenes.sample("val", i) for i in range(cfg.val_samples)]
    feats = cache_features(vit_model, train_seeds, cfg.vit, work / "train_features.pt", log, progress)
    val_feats = cache_features(vit_model, [s.scene.seed for s in val], cfg.vit, work / "val_features.pt", log, progress)
    val_qa = [(s.question, s.answer) for s in val]
    timings["feature_cache_s"] = time.time() - t

    # 3. Projector + LM.
    t = time.time()
    processor = build_processor(work, cfg.vit)
    tokenizer = processor.tokenizer
    model = build_model(cfg, tokenizer)
    model.model.vision_tower.load_state_dict(vit_model.state_dict())
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    balance_scales(model, feats[:256])
    if cfg.align_init:
        align_init(model, tokenizer, load_dense_head(work, cfg.vit), seed=cfg.seed)
    groups = param_groups(model, cfg.lr, cfg.aligned_lr_scale if cfg.align_init else 1.0)
    owners: dict[int, np.ndarray] = {}  # scene index -> patch owner map (for the grounding targets)

    def owner_of(i: int, scene) -> np.ndarray:
        if i not in owners:
            owners[i] = scenes.patch_owner(scene, cfg.vit.image_size, cfg.vit.patch_size)
        return owners[i]

    history = train_lm(
        model, tokenizer, cfg, groups,
        next_batch=lambda r: question_batch(cfg, r, train_seeds, feats, owner_of),
        project=project_llava, val=(val_feats, val_qa, [s.family for s in val]), ckpt=work / "lm_ckpt.pt",
        log=log, progress=progress,
    )
    timings["lm_train_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start

    # 4. Save (hub layout), with the recipe and timings beside it.
    model.eval()
    save_hub_layout(model, processor, out)
    (out / "training.json").write_text(
        json.dumps({"config": asdict(cfg), "timings": timings, "history": history, "threads": threads}, indent=2)
    )
    log(f"saved demo to {out} ({timings})")
    return out


def load_dense_head(work: Path, vit: VitConfig) -> nn.Linear:
    """The dense patch-class head of the ViT pretraining (kept in its last checkpoint)."""
    from vlmprune.testbed.vit import PretrainHeads

    state = torch.load(work / "vit_ckpt.pt", map_location="cpu", weights_only=False)  # our own file
    heads = PretrainHeads(vit.hidden_size)
    heads.load_state_dict(state["heads"])
    return heads.dense
