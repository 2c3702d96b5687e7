"""The LM stage that ``demo`` and ``demo-next`` share: projector + LM trained on cached ViT features.

Next-token loss on the answer tokens only, over multi-turn conversations (several templated
questions about one cached scene, which multiplies the supervision per LM forward pass), plus the
attention supervision of :mod:`vlmprune.testbed.grounding` and token dropout (the LM sees images of
every length, as pruning makes them). The recipes (:mod:`vlmprune.testbed.train`,
:mod:`vlmprune.testbed.train_next`) supply the model, the batches and the projection of their
features; :func:`train_lm` is resumable from its checkpoint.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlmprune.testbed import scenes
from vlmprune.testbed.grounding import (
    answer_rows,
    coordinate_loss,
    grounding_loss,
    head_targets,
    naming_word_keys,
    order_targets,
    visual_keys,
)
from vlmprune.testbed.tiny import IMAGE_TOKEN


def prompt_text(question: str) -> str:
    """The chat-templated prompt of one image + question (what :data:`CHAT_TEMPLATE` renders)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


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
