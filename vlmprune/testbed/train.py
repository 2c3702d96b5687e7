"""Training of the shipped testbed models: ``vlmprune train demo [--out DIR] [--steps N] [--seed S]``.

``demo`` (LLaVA-1.5 style, transformers ``LlavaForConditionalGeneration``) is trained in three
resumable stages inside ``--out``'s work folder:

1. ViT pretraining (:mod:`vlmprune.testbed.vit`), through [CLS] on scene-level targets plus dense
   per-patch read-outs (colour, shape, digit, size, count, grid position);
2. the frozen ViT's penultimate-layer patch features of a fixed pool of train scenes are cached once
   (the LM stage never runs the ViT again);
3. projector (2-layer MLP) + a small Llama LM from scratch: next-token loss on the answer tokens
   only, over multi-turn conversations (several templated questions about one cached scene, which
   multiplies the supervision per LM forward pass), plus attention supervision of two hops
   (:func:`grounding_loss`): without it the LM sat on the answer prior in every CPU-sized run; a
   read-out of the asked objects' coordinates for position questions (:func:`coordinate_loss`),
   and token dropout (the LM sees images of every length, as pruning makes them).

The LM stage (:func:`train_lm`) is shared with ``demo-next`` (:mod:`vlmprune.testbed.train_next`).

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
from vlmprune.testbed.tiny import CHAT_TEMPLATE, IMAGE_TOKEN
from vlmprune.testbed.vit import VitConfig, clip_config, image_processor, pixels, pretrain

def prompt_text(question: str) -> str:
    """The chat-templated prompt of one image + question (what :data:`CHAT_TEMPLATE` renders)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


@dataclass(frozen=True)
class LmConfig:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class LmStageConfig:
    """The knobs of the LM stage (:func:`train_lm`), shared by ``demo`` and ``demo-next``."""

    cache_scenes: int = 8000
    questions_per_scene: int = 10
    turns: int = 5
    """Questions per training sequence: a multi-turn conversation about one image, as LLaVA trains."""
    steps: int = 2500
    batch: int = 16
    lr: float = 2e-3
    val_samples: int = 250
    grounding_weight: float = 1.0
    """Weight of the attention-supervision loss (see :func:`grounding_loss`); 0 turns it off."""
    grounding_layer: int = 1
    grounding_heads: tuple[int, ...] = (0, 1)
    order_layer: int = 0
    """Decoder layer whose ``grounding_heads`` are taught a third hop for position questions (0: off):
    head 0 looks at whichever of the two objects comes first along the asked axis, head 1 at the
    other (:func:`order_targets`). Off: in 1200 steps the heads still split their mass ~50/50
    between the two objects (the keys do not carry position sharply enough); see ``coord_weight``."""
    coord_weight: float = 1.0
    """Weight of the coordinate read-out loss (:func:`coordinate_loss`); 0 turns it off."""
    coord_layer: int = 2
    """Residual stream (input of this decoder layer) the coordinates are read from."""
    token_dropout: float = 0.5
    """Probability that a batch sees only a random, order-kept subset of its visual tokens (10-100 %),
    so that the LM does not learn to depend on the image's length: without it, the LM trained on
    full-length images only answers "left"/"right" to presence questions once any token is pruned
    (see the model card's "pruning robustness")."""
    seed: int = 0


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


def resumable_cache(path: Path, seeds: list[int], step: int, encode, log=print, progress: bool = True,
                    save_every: int = 8) -> torch.Tensor:
    """``encode(batches)`` -> one (b, ...) tensor per batch of ``step`` seeds, concatenated and saved
    to ``path``; returned from there when complete. Finished batches go to ``PATH.part.pt`` every
    ``save_every`` batches, so an interrupted run resumes after the last of them."""
    from tqdm import tqdm

    if path.is_file():
        feats = torch.load(path, map_location="cpu")
        if feats.shape[0] == len(seeds):
            return feats
    part = path.with_suffix(".part.pt")
    chunks: list[torch.Tensor] = torch.load(part, weights_only=False) if part.is_file() else []
    done = sum(c.shape[0] for c in chunks)
    batches = [seeds[start : start + step] for start in range(done, len(seeds), step)]
    for feats in tqdm(encode(batches), total=len(batches), desc=f"cache {path.stem}", disable=not progress):
        chunks.append(feats)
        if len(chunks) % save_every == 0:
            torch.save(chunks, part)
    feats = torch.cat(chunks)
    torch.save(feats, path)
    part.unlink(missing_ok=True)
    log(f"cached {tuple(feats.shape)} features to {path}")
    return feats


# --- LM stage ---------------------------------------------------------------------------------------


class QuestionBatcher:
    """Token ids of (question, answer) pairs; the image placeholder stays ONE token here and the
    projected patch features are spliced in at its position (the processor would expand it)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str, special: bool = True) -> list[int]:
        key = f"{special}|{text}"
        if key not in self._cache:
            self._cache[key] = self.tok(text, add_special_tokens=special)["input_ids"]
        return self._cache[key]

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One question per row: see :meth:`conversations`."""
        return self.conversations([[pair] for pair in pairs])

    def conversations(self, rows_qa: list[list[tuple[str, str]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(B, T) ids of multi-turn conversations about one image each (LLaVA's training format:
        ``USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>...``), right padded;
        (B, T) next-token labels (-100 except where the next token is an answer token or eos);
        the image position (the same in every row)."""
        rows, labels = [], []
        for turns in rows_qa:
            row: list[int] = []
            is_target: list[bool] = []
            for k, (question, answer) in enumerate(turns):
                prompt = self.ids(prompt_text(question)) if k == 0 else self.ids(f"USER: {question} ASSISTANT:", False)
                target = self.ids(answer, special=False) + [self.eos]
                row += prompt + target
                is_target += [False] * len(prompt) + [True] * len(target)
            rows.append(row)
            labels.append([row[j + 1] if is_target[j + 1] else -100 for j in range(len(row) - 1)] + [-100])
        pos = {r.index(self.image_id) for r in rows}
        if len(pos) != 1:
            raise ValueError(f"the image placeholder must sit at one position in every prompt, got {pos}")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lb) in enumerate(zip(rows, labels)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, : len(lb)] = torch.tensor(lb)
        return ids, lab, pos.pop()


def project_llava(model, feats: torch.Tensor) -> torch.Tensor:
    """(B, P, c) cached ViT features -> (B, P, d) visual tokens of a LLaVA-1.5 model."""
    return model.model.multi_modal_projector(feats.float())


def lm_forward(model, ids: torch.Tensor, image_pos: int, visual: torch.Tensor, all_hidden: bool = False):
    """Last hidden states (B, T - 1 + n, d) of the LLM over text with the (B, n, d) visual tokens
    spliced in (and, with ``all_hidden``, the residual stream entering every decoder layer:
    (embeds, l1, ...)).

    Right padding needs no attention mask: causal attention never lets a real token see a pad."""
    embed = model.get_input_embeddings()(ids)  # (B, T, d)
    embeds = torch.cat([embed[:, :image_pos], visual, embed[:, image_pos + 1 :]], dim=1)
    out = model.model.language_model(inputs_embeds=embeds, output_hidden_states=all_hidden)
    if not all_hidden:
        return out.last_hidden_state
    return out.last_hidden_state, out.hidden_states


def grounding_loss(
    model, layer: int, heads: tuple[int, ...], layer_in: torch.Tensor, rows: list[list[int]],
    masks: list[list[list[np.ndarray]]],
) -> torch.Tensor:
    """Attention supervision: -log of the attention mass that ``heads`` of decoder ``layer`` put on
    the target keys, from the position that predicts each answer.

    Answer-only next-token loss gives the LM's attention a weak, late signal about *where* to look
    (the answer prior is learnt long before), and the small LM settles into ignoring the image.
    The scene generator knows the answer's evidence, so two hops are supervised (the rest of the
    LM learns freely): layer 0 gathers the question's naming words ("red", "circle") into the
    answer position, layer 1 looks up the patches of the object they name.
    ``rows[b]`` = answer-predicting positions of row b (spliced sequence); ``masks[b][t][h]`` =
    (L,) bool target keys for supervised head ``h`` at row ``t`` (all-False: nothing to supervise,
    e.g. "is there ..." answered "no" has no object to look at)."""
    from vlmprune.signals.attention import attention_rows, decoder_layer_qk

    lm = model.model.language_model
    decoder = lm.layers[layer]
    length = layer_in.shape[1]
    cos, sin = lm.rotary_emb(layer_in[:1], torch.arange(length, device=layer_in.device)[None])
    terms = []
    for b, row_pos in enumerate(rows):
        if not row_pos:
            continue
        q, k = decoder_layer_qk(decoder, layer_in[b], (cos, sin))  # (L, H, D), (L, Hkv, D)
        r = torch.tensor(row_pos, device=layer_in.device)
        probs = attention_rows(q[r], k, r)[list(heads)]  # (h, t, L)
        target = torch.from_numpy(np.stack([np.stack(m) for m in masks[b]], 1)).to(layer_in.device)  # (h, t, L)
        valid = target.any(-1)  # (h, t)
        if valid.any():
            mass = (probs * target).sum(-1)[valid]
            terms.append(-torch.log(mass.clamp_min(1e-6)))
    if not terms:
        return layer_in.new_zeros(())
    return torch.cat(terms).mean()


def visual_keys(patch_masks: list[np.ndarray], image_pos: int, length: int) -> list[np.ndarray]:
    """(P,) patch masks -> (length,) key masks of the spliced sequence (patches start at ``image_pos``)."""
    out = []
    for m in patch_masks:
        full = np.zeros(length, dtype=bool)
        full[image_pos : image_pos + m.shape[0]] = m
        out.append(full)
    return out


def naming_word_keys(
    ids: list[int], rows: list[int], families: list[str], naming_ids: set[int], image_pos: int, n_visual: int,
    length: int, n_heads: int,
) -> list[list[np.ndarray]]:
    """Per turn, per head, the (length,) key mask of the question words that name the asked-about
    object(s) (colours, shapes, "box"), in spliced-sequence coordinates: for a position question the
    first head gets the first object's words and the second head the other's."""
    def spliced(j: int) -> int:
        return j + n_visual - 1 if j > image_pos else j

    out, prev = [], 0
    original_rows = [r - n_visual + 1 if r > image_pos else r for r in rows]
    for family, row in zip(families, original_rows):
        words = [spliced(j) for j in range(prev, row + 1) if ids[j] in naming_ids]
        prev = row + 1
        groups = [words[:2], words[2:]] if family == "position" and len(words) == 4 else [words, words]
        masks = []
        for h in range(n_heads):
            full = np.zeros(length, dtype=bool)
            full[groups[h] if h < 2 else words] = True
            masks.append(full)
        out.append(masks)
    return out


def head_targets(scene, owner: np.ndarray, family: str, targets, n_heads: int) -> list[np.ndarray]:
    """(P,) bool target patches per supervised head: for a position question the first head looks
    at the first object and the second at the other; otherwise every head at all asked-about ones."""
    def of(items) -> np.ndarray:
        return scenes.item_patches(scene, owner, items)

    if family == "position" and len(targets) == 2:
        return [of([targets[h]]) if h < 2 else of(targets) for h in range(n_heads)]
    return [of(targets)] * n_heads


def order_targets(scene, owner: np.ndarray, family: str, answer: str, targets, n_heads: int) -> list[np.ndarray]:
    """(P,) bool target patches per head for the third hop of a position question ("is A left or
    right of B ?"): head 0 -> the object that comes first along the asked axis (left / upper), head 1
    -> the other; nothing (all-False) for every other family.

    The idea: attention picks the first object, and the answer only asks whether it is the one
    named first (identity matching). Measured: the heads never learnt to choose (mass 0.52 / 0.53
    on the two objects after 1200 steps), so it is off in the recipe (``DemoConfig.order_layer``);
    :func:`coordinate_loss` is what fixed position questions."""
    none = np.zeros(owner.shape, dtype=bool)
    if family != "position" or len(targets) != 2:
        return [none] * n_heads
    a, b = targets
    first, second = (a, b) if answer in ("left", "above") else (b, a)
    return [scenes.item_patches(scene, owner, [first if h == 0 else second]) for h in range(n_heads)]


def coordinate_loss(head: nn.Linear, layer_in: torch.Tensor, rows: list[list[int]], coords: list[list]) -> torch.Tensor:
    """MSE of a linear read-out of both objects' centres (xA, yA, xB, yB in [-1, 1]) from the
    residual stream at the rows that answer position questions.

    Position was the one family the LM did not learn (0.51, chance 0.36): a linear probe on the
    residual after the two supervised hops recovered the objects' coordinates with R^2 ~0.3 only,
    so the later layers had no clean positions to compare. Asking the stream to carry them makes
    the comparison a small function of two linear features. The head is a training-only probe
    (not part of the saved model)."""
    picked, targets = [], []
    for b, (row_pos, row_coords) in enumerate(zip(rows, coords)):
        for r, c in zip(row_pos, row_coords):
            if c is not None:
                picked.append(layer_in[b, r])
                targets.append(c)
    if not picked:
        return layer_in.new_zeros(())
    target = torch.tensor(np.stack(targets), dtype=layer_in.dtype, device=layer_in.device) * 2 - 1
    return nn.functional.mse_loss(head(torch.stack(picked)), target)


def answer_rows(labels: torch.Tensor, image_pos: int, n_visual: int) -> list[list[int]]:
    """Per row, the spliced-sequence positions that predict the FIRST token of each answer."""
    out = []
    for lab in labels.tolist():
        rows = [j for j in range(len(lab)) if lab[j] != -100 and (j == 0 or lab[j - 1] == -100)]
        out.append([j + n_visual - 1 if j > image_pos else j for j in rows])
    return out


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


def answer_loss(model, ids, labels, image_pos, visual, all_hidden: bool = False):
    """Cross-entropy on the answer tokens (and, with ``all_hidden``, the layer inputs
    :func:`grounding_loss` needs); ``visual`` (B, n, d) projected visual tokens."""
    out = lm_forward(model, ids, image_pos, visual, all_hidden)
    hidden, layer_ins = out if all_hidden else (out, None)  # (B, L, d)
    n = visual.shape[1]
    fill = torch.full((labels.shape[0], n), -100, dtype=labels.dtype, device=labels.device)
    full_labels = torch.cat([labels[:, :image_pos], fill, labels[:, image_pos + 1 :]], 1)
    sel = full_labels != -100  # (B, L): positions whose next token is an answer token
    logits = model.lm_head(hidden[sel])  # (n, V)
    loss = nn.functional.cross_entropy(logits, full_labels[sel])
    return (loss, layer_ins) if all_hidden else loss


@torch.no_grad()
def first_token_accuracy(
    model, batcher: QuestionBatcher, feats: torch.Tensor, qa: list[tuple[str, str]], families: list[str] | None = None,
    project=project_llava, chunk: int = 64,
):
    """Accuracy of the greedy first answer token (the answer is one word) on cached features
    (``project`` turns them into visual tokens); with ``families`` also the accuracy per family,
    as ``(overall, {family: acc})``."""
    hits = []
    device = next(model.parameters()).device
    for start in range(0, len(qa), chunk):
        pairs = qa[start : start + chunk]
        ids, labels, pos = batcher.batch(pairs)
        visual = project(model, feats[start : start + chunk].to(device))
        hidden = lm_forward(model, ids.to(device), pos, visual)
        first = (labels != -100).float().argmax(1) + visual.shape[1] - 1  # position predicting the first answer token
        logits = model.lm_head(hidden[torch.arange(len(pairs)), first.to(device)])
        target = torch.tensor([batcher.ids(a, special=False)[0] for _, a in pairs], device=device)
        hits += (logits.argmax(-1) == target).tolist()
    overall = sum(hits) / max(1, len(hits))
    if families is None:
        return overall
    per = {f: round(float(np.mean([h for h, g in zip(hits, families) if g == f])), 3) for f in dict.fromkeys(families)}
    return overall, per


@dataclass
class LmBatch:
    """One LM-stage batch, whatever the model: conversations (one scene each), their raw ViT
    features, and the grounding targets as (n,) bool masks over the visual tokens in the order the
    LM sees them, per row, turn and supervised head (hop two: the asked-about objects; hop three:
    the position order, see :func:`order_targets`; empty when that hop is off)."""

    idx: list[int]
    convs: list[list[tuple[str, str]]]
    families: list[list[str]]
    feats: torch.Tensor
    look: list[list[list[np.ndarray]]]
    order: list[list[list[np.ndarray]]]
    coords: list[list[np.ndarray | None]]
    """Per row and turn: (xA, yA, xB, yB) of a position question's two objects, else None."""


def question_batch(cfg, r: random.Random, seeds: list[int], feats: torch.Tensor, owner_of, scale: float = 1.0) -> LmBatch:
    """``cfg.batch`` cached scenes with ``cfg.turns`` of their fixed question pool each (the pool is
    fixed by (scene, k): finite and reproducible); ``owner_of(i, scene)`` gives scene ``i``'s owner
    map over the visual tokens (item index + 1 per token, 0 background, -1 for non-image tokens)."""
    idx = [r.randrange(len(seeds)) for _ in range(cfg.batch)]
    n_heads = len(cfg.grounding_heads)
    convs, look, order, families, coords = [], [], [], [], []
    for i in idx:
        scene = scenes.make_scene(seeds[i], scale)
        owner = owner_of(i, scene)
        turns, turn_look, turn_order, turn_families, turn_coords = [], [], [], [], []
        for k in r.sample(range(cfg.questions_per_scene), cfg.turns):
            qrng = random.Random(seeds[i] * 31 + k)
            family = scenes.FAMILIES[(i + k) % len(scenes.FAMILIES)]
            q, a, meta = scenes.question_for(scene, family, qrng)
            turns.append((q, a))
            turn_families.append(family)
            turn_look.append(head_targets(scene, owner, family, meta["targets"], n_heads))
            if cfg.order_layer:  # the third hop's targets, only when it is trained
                turn_order.append(order_targets(scene, owner, family, a, meta["targets"], n_heads))
            else:
                turn_order.append([])
            pair = meta["targets"] if family == "position" else []
            turn_coords.append(np.array([pair[0].x, pair[0].y, pair[1].x, pair[1].y]) if len(pair) == 2 else None)
        convs.append(turns)
        coords.append(turn_coords)
        look.append(turn_look)
        order.append(turn_order)
        families.append(turn_families)
    return LmBatch(idx, convs, families, feats[idx], look, order, coords)


def drop_visual_tokens(visual: torch.Tensor, masks: list, prunable: np.ndarray | None, r: random.Random):
    """Token dropout: every row keeps a random, order-kept subset of its prunable visual tokens (one
    count k for the batch, 10-100 %) and all the others (LLaVA-NeXT's newlines); the per-token
    target masks are cut the same way."""
    n_all = visual.shape[1]
    pool = list(range(n_all)) if prunable is None else np.nonzero(prunable)[0].tolist()
    fixed = [] if prunable is None else np.nonzero(~prunable)[0].tolist()
    k = r.randint(max(1, len(pool) // 10), len(pool))
    keep = [sorted(fixed + r.sample(pool, k)) for _ in range(visual.shape[0])]
    visual = torch.stack([visual[b, keep[b]] for b in range(visual.shape[0])])
    cut = [[[[m[keep[b]] for m in heads] for heads in turns] for b, turns in enumerate(group)] for group in masks]
    return visual, cut


def train_lm(
    model, tokenizer, cfg, groups: list[dict], next_batch, project, val, ckpt: Path, log=print, progress: bool = True,
    prunable: np.ndarray | None = None, device: str = "cpu",
) -> list[dict]:
    """The LM stage (projector + LM; the vision tower is frozen), resumable from ``ckpt``.

    ``next_batch(rng) -> LmBatch``; ``project(model, feats) -> (B, n, d)`` visual tokens; ``val`` =
    (features, [(question, answer)], families). Loss: answer cross-entropy + ``cfg.grounding_weight``
    x the supervised attention of three hops (:func:`grounding_loss`). Returns the history (val
    accuracy per family every 200 steps)."""
    from tqdm import tqdm

    coord_head = nn.Linear(model.config.text_config.hidden_size, 4).to(device)  # training-only probe
    groups = [*groups, {"params": list(coord_head.parameters()), "lr": groups[0]["lr"]}]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: float(min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps)))))
    )
    batcher = QuestionBatcher(tokenizer)
    naming_ids = {tokenizer.convert_tokens_to_ids(w) for w in (*scenes.COLOURS, *scenes.SHAPES, "box")}
    n_heads = len(cfg.grounding_heads)
    val_feats, val_qa, val_families = val
    start, history, t = 0, [], time.time()
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)  # our own checkpoint
        model.load_state_dict(state["model"])
        coord_head.load_state_dict(state["coord_head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, history = state["step"], state["history"]
        log(f"lm: resumed at step {start}")
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="lm train", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        r = random.Random(cfg.seed * 1_000_003 + 7 + step)
        batch = next_batch(r)
        ids, labels, pos = batcher.conversations(batch.convs)
        ids, labels = ids.to(device), labels.to(device)
        visual = project(model, batch.feats.to(device))  # (B, n, d)
        look, order = batch.look, batch.order
        if cfg.token_dropout > 0 and r.random() < cfg.token_dropout:
            visual, (look, order) = drop_visual_tokens(visual, [look, order], prunable, r)
        if cfg.grounding_weight > 0:
            n_vis = visual.shape[1]
            answer, layer_ins = answer_loss(model, ids, labels, pos, visual, all_hidden=True)
            length = layer_ins[0].shape[1]
            rows = answer_rows(labels.cpu(), pos, n_vis)
            keys = [[visual_keys(m, pos, length) for m in row_masks] for row_masks in look]
            ground = grounding_loss(model, cfg.grounding_layer, cfg.grounding_heads, layer_ins[cfg.grounding_layer],
                                    rows, keys)
            if cfg.grounding_layer > 0:  # the hop before: gather the naming words
                gather = [
                    naming_word_keys(ids[b].tolist(), rows[b], batch.families[b], naming_ids, pos, n_vis, length, n_heads)
                    for b in range(len(batch.idx))
                ]
                ground = ground + grounding_loss(model, 0, cfg.grounding_heads, layer_ins[0], rows, gather)
            if cfg.order_layer > 0:  # the hop after, for position questions
                keys = [[visual_keys(m, pos, length) for m in row_masks] for row_masks in order]
                ground = ground + grounding_loss(model, cfg.order_layer, cfg.grounding_heads, layer_ins[cfg.order_layer],
                                                 rows, keys)
            if cfg.coord_weight > 0:
                ground = ground + cfg.coord_weight * coordinate_loss(coord_head, layer_ins[cfg.coord_layer], rows,
                                                                     batch.coords)
        else:
            answer, ground = answer_loss(model, ids, labels, pos, visual), torch.zeros(())
        loss = answer + cfg.grounding_weight * ground
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(answer=f"{answer.item():.3f}", ground=f"{ground.item():.3f}")
        if (step + 1) % 200 == 0 or step + 1 == cfg.steps:
            model.eval()
            acc, per_family = first_token_accuracy(model, batcher, val_feats, val_qa, val_families, project)
            model.train()
            history.append({"step": step + 1, "answer_loss": answer.item(), "grounding_loss": ground.item(),
                            "val_first_token_acc": acc, "val_per_family": per_family})
            log(f"lm step {step + 1}/{cfg.steps} answer loss {answer.item():.4f} grounding {ground.item():.3f} "
                f"val acc {acc:.3f} {per_family} ({time.time() - t:.0f} s)")
            torch.save(
                {"model": model.state_dict(), "coord_head": coord_head.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "step": step + 1, "history": history},
                ckpt,
            )
    return history


def prepare_run(out: Path, work: Path | None, cfg, threads: int) -> tuple[Path, Path]:
    """(out, work folder) of a training run; the work folder (default ``OUT.work``) is created and
    gets the recipe as ``config.json``."""
    torch.set_num_threads(threads)
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return out, work


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


# --- saving -----------------------------------------------------------------------------------------


def save_hub_layout(model, processor, out: Path) -> None:
    """Write ``model`` + ``processor`` so that transformers AND vLLM 0.32 load them.

    Uses :func:`vlmprune.testbed.vllm_layout.save_for_vllm` when present; otherwise transformers' save_pretrained
    followed by :func:`_rename_vision_keys` (transformers 5 writes ``vision_tower.embeddings...``,
    vLLM's LLaVA loader wants the hub's ``vision_tower.vision_model.embeddings...``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from vlmprune.testbed import vllm_layout  # written by another issue; preferred when present
    except ImportError:
        vllm_layout = None
    saver = getattr(vllm_layout, "save_for_vllm", None) if vllm_layout is not None else None
    if saver is not None:
        saver(model, processor, out)
        return
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _rename_vision_keys(out)


def _rename_vision_keys(out: Path) -> None:
    """Rewrite ``vision_tower.X`` keys (X not already ``vision_model.``) as ``vision_tower.vision_model.X``."""
    from safetensors.torch import load_file, save_file

    files = sorted(Path(out).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors files in {out}")
    renamed: dict[str, str] = {}
    for f in files:
        tensors = load_file(f)
        fixed = {}
        for k, v in tensors.items():
            new = k
            head, sep, rest = k.partition("vision_tower.")
            if sep and not rest.startswith("vision_model."):
                new = f"{head}vision_tower.vision_model.{rest}"
            fixed[new] = v.contiguous()
            if new != k:
                renamed[k] = new
        save_file(fixed, f, metadata={"format": "pt"})
    index = Path(out) / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


# --- command line -----------------------------------------------------------------------------------


def run_cli(args) -> int:
    """``vlmprune train demo``: checks the arguments (ValueError names the flag), trains, prints
    one JSON line {model, out}. Progress and logs go to stderr."""
    import dataclasses
    import sys

    if args.model not in ("demo", "demo-next"):
        raise ValueError(f"model: 'demo' or 'demo-next' can be trained, got {args.model!r}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.model == "demo-next":
        return _run_next(args)
    cfg = DemoConfig(seed=args.seed)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.vit_steps is not None:
        if args.vit_steps < 1:
            raise ValueError(f"--vit-steps must be >= 1, got {args.vit_steps}")
        cfg = dataclasses.replace(cfg, vit_steps=args.vit_steps)
    out = Path(args.out) if args.out else Path("runs") / args.model
    train_demo(
        out, cfg, work=Path(args.work) if args.work else None, threads=args.threads,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(json.dumps({"model": args.model, "out": str(out)}))
    return 0


def _run_next(args) -> int:
    """``vlmprune train demo-next``: see :mod:`vlmprune.testbed.train_next`."""
    import dataclasses
    import sys

    from vlmprune.testbed.train_next import NextConfig, train_next

    if args.vit_steps is not None:
        raise ValueError("--vit-steps: demo-next reuses the ViT of its --base model")
    cfg = NextConfig(seed=args.seed)
    if args.base is not None:
        cfg = dataclasses.replace(cfg, base=args.base)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
    out = Path(args.out) if args.out else Path("runs") / args.model
    train_next(
        out, cfg, work=Path(args.work) if args.work else None, threads=args.threads, device=args.device,
        workers=workers, log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(json.dumps({"model": args.model, "out": str(out)}))
    return 0
