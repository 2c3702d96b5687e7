"""Training of the explain method's relevance CNN: ``vlmprune train explain --model MODEL``.

The explain method (:mod:`vlmprune.core.explain`, PRUNERS.md section 5) scores visual tokens with a
small CNN that must be trained once per VLM. Training is distillation from an expensive offline
teacher to a cheap online student:

1. **Teacher labels** (the expensive part, cached and resumable). For each train-split sample of
   :mod:`vlmprune.testbed.scenes` the VLM answers greedily (the reference backend at ratio 0, i.e.
   the stock computation, with the ``vlmprune eval`` answer rule); by default only correctly
   answered samples are kept, since an explanation of a wrong answer points at the wrong tokens.
   The prompt + answer is then replayed teacher-forced with eager attention, and for each answer
   token the gradient of its logit w.r.t. every layer's attention map gives Chefer-style generic
   attention relevance (``R = I; R += mean_heads(clamp(A * dA, min=0)) @ R`` layer by layer). The
   answer-predicting row's visual columns, averaged over answer tokens, are ``R_v``.
2. **Student input**: the layer-0 instruction -> visual attention exactly as the explain method
   computes it at inference (:meth:`ReferenceBackend.explain_inputs`, the same code path), so
   train and inference inputs cannot drift apart.
3. **Student training**: :class:`RelevanceCNN`, loss :func:`kl_loss` against
   :func:`teacher_target` (top 50 % of ``R_v``, renormalised), Adam, seeded; ~10 % of the labelled
   samples are held out. Besides the KL, the held-out report gives the *top-k recall* (how many of
   the teacher's top-k tokens the student's top-k keeps), next to the same recall of the raw input
   attention: the student is only worth its weights if it beats its own input. Recall is
   reported at every keep fraction of :data:`RECALL_FRACTIONS` (ratios 0.5 / 0.75 / 0.9 / 0.95)
   and as teacher mass kept: the teacher is peaked, so top-50 % recall alone mostly measures how
   its near-zero tokens are ordered. ``--loss ranks|pairwise`` trains against the teacher's order
   at those fractions instead of the paper's KL (measured on ``demo``: better top-50 % recall,
   the same top-10 %, lower accuracy; the KL stays the default).

Outputs: the checkpoint (default ``<model>/vlmprune_explain_cnn.pt``, where the explain method
finds it without a ``checkpoint`` field), a JSON report with the same stem, and the label cache
``<stem>.labels.pt`` beside them (delete it to relabel; it is reused only for the same model
weights and labelling recipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlmprune.core.explain import (
    CHECKPOINT_NAME,
    RelevanceCNN,
    RelevanceCNNConfig,
    kl_loss,
    pairwise_loss,
    rank_levels,
    rank_target,
    teacher_target,
)
from vlmprune.core.select import topk_sorted
from vlmprune.policy import kept_count

LABEL_FORMAT = 1
"""Version of the label recipe stored in the cache; bump it when the teacher's definition changes,
so stale labels are never trained on."""

MAX_NEW_TOKENS = 3
"""Greedy answer length, as ``vlmprune eval`` (answers are single words)."""

VAL_FRACTION = 0.1

LOSSES = ("kl", "ranks", "pairwise")
"""``kl``: the paper's KL to the top-50 % teacher mass (:func:`teacher_target`); ``ranks``: KL to a
rank staircase over several keep fractions (:func:`rank_target`); ``pairwise``: a logistic ranking
loss over (kept, dropped) pairs at those fractions (:func:`pairwise_loss`)."""

RECALL_FRACTIONS = (0.5, 0.25, 0.1, 0.05)
"""Keep fractions the held-out report measures recall at (ratio 0.5 / 0.75 / 0.9 / 0.95)."""


@dataclass(frozen=True)
class ExplainTrainConfig:
    """Every knob of the recipe (recorded in the JSON report)."""

    samples: int = 2000
    """Train-split samples to label (indices 0..samples-1); only correct ones are used by default.
    CPU-sized (labelling the demo costs ~0.1 s per sample); the paper labels ~10K samples."""
    epochs: int = 50
    """The paper trains 100 epochs (batch 128) on ~10K samples; 50 on 2000 keeps a CPU run near a
    quarter of an hour, and the best-validation epoch is kept anyway."""
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    only_correct: bool = True
    """False keeps wrongly answered samples: for tests and smoke runs on untrained models only."""
    keep_fraction: float = 0.5
    """The teacher label keeps this top fraction of ``R_v`` (the paper's 50 %)."""
    channels: tuple[int, ...] = RelevanceCNNConfig.channels
    """The CNN's block channels (the paper's 32 -> 512 by default)."""
    grid: tuple[int, int] | None = None
    """None: the paper's 1-D CNN over the token sequence; (rows, cols): 2-D over the patch grid
    (``--cnn grid`` reads it from the model: LLaVA-1.5-style models only)."""
    loss: str = "kl"
    """One of :data:`LOSSES` (``--loss``); the best epoch is the one with the lowest validation loss."""

    def validate(self) -> None:
        """ValueError naming the CLI flag of the first bad value."""
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        try:
            RelevanceCNNConfig(channels=self.channels, grid=self.grid)
        except ValueError as exc:
            raise ValueError(f"--cnn-channels / --cnn: {exc}") from None


# --- teacher: generic attention explainability -----------------------------------------------------


@contextlib.contextmanager
def eager_attention(text_model) -> Iterator[None]:
    """Run ``text_model`` with eager attention inside the block (SDPA/flash never return the
    probabilities, let alone a differentiable tensor of them); the previous implementation is
    restored after, so greedy answers elsewhere keep the model's own kernel."""
    previous = getattr(text_model.config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    text_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous is not None:
            text_model.set_attn_implementation(previous)


def chefer_relevance(backend, seq, answer_ids: list[int]) -> torch.Tensor:
    """Relevance of every prompt token for the answer, (L,) fp32, L = ``seq.length``.

    Teacher-forced replay of ``seq`` (the unpruned prompt) + the answer tokens (all but the last
    are inputs); for each answer token t, ``y_t`` = its logit at the row that predicts it, and
    per layer ``A`` (H, L', L') with ``dA = dy_t/dA``. Chefer et al.'s propagation for
    self-attention: ``R = I``, then ``R += mean_h(clamp(A * dA, min=0)) @ R`` from the first layer
    to the last; the predicting row of ``R`` is token t's explanation. The rows are averaged over
    answer tokens and restricted to the prompt columns.
    """
    if not answer_ids:
        raise ValueError("answer_ids must not be empty")
    adapter = backend.adapter
    text_model = adapter.text_model
    prompt_len = seq.length
    n = len(answer_ids)
    extra = torch.as_tensor(answer_ids[:-1], dtype=torch.long, device=seq.embeds.device)
    embeds, positions = seq.embeds, seq.positions
    if extra.numel():
        embeds = torch.cat([embeds, backend.model.get_input_embeddings()(extra).to(embeds.dtype)])
        positions = torch.cat([positions, adapter.next_positions(positions, extra.numel())], dim=-1)
    rows = torch.arange(prompt_len - 1, prompt_len - 1 + n, device=embeds.device)  # predicting rows
    with torch.enable_grad(), eager_attention(text_model):
        embeds = embeds.detach().requires_grad_(True)  # a graph even if the weights are frozen
        out = text_model(
            inputs_embeds=embeds[None],
            position_ids=positions[None] if positions.ndim == 1 else positions[:, None],
            output_attentions=True,
            use_cache=False,
        )
        attentions = out.attentions
        if not attentions or any(a is None for a in attentions):
            raise RuntimeError("the text model returned no attention maps (eager attention not in effect?)")
        logits = adapter.lm_head(out.last_hidden_state[0, rows])  # (n, V)
        targets = torch.as_tensor(answer_ids, device=logits.device)
        scores = logits.gather(1, targets[:, None])[:, 0]  # (n,)
        length = embeds.shape[0]
        total = torch.zeros(length, dtype=torch.float32, device=embeds.device)
        for t in range(n):
            grads = torch.autograd.grad(scores[t], attentions, retain_graph=t + 1 < n)
            rel = torch.eye(length, dtype=torch.float32, device=embeds.device)
            for a, g in zip(attentions, grads):
                cam = (a[0].detach().float() * g[0].float()).clamp_min(0).mean(dim=0)  # (L', L')
                rel = rel + cam @ rel
            total += rel[rows[t]]
    return (total / n)[:prompt_len]


def teacher_relevance(backend, seq, image, answer_ids: list[int], eos: set[int]) -> torch.Tensor:
    """``R_v``: :func:`chefer_relevance` of the greedy answer (end-of-sequence tokens dropped) at
    one image's prunable tokens, (n_prunable,) fp32 on the CPU, in the order explain scores them."""
    from vlmprune.reduction.reduce import prunable_values

    answer = [t for t in answer_ids if t not in eos] or answer_ids[:1]
    rel = chefer_relevance(backend, seq, answer)  # (L,)
    return prunable_values(image, rel[seq.image_spans[0]])[1].float().cpu()


# --- labelling (cached, resumable) -----------------------------------------------------------------


def model_fingerprint(model_dir: Path) -> str:
    """Cheap identity of a model folder's weights: config + size and head/tail bytes of every
    weight file. Copies of the same model match; retrained weights do not."""
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def labels_path(out: Path) -> Path:
    """The label cache beside the checkpoint: ``<stem>.labels.pt``."""
    return out.with_name(out.stem + ".labels.pt")


def _load_cache(path: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, Any]:
    fresh = {"format": LABEL_FORMAT, "fingerprint": fingerprint, "max_new_tokens": MAX_NEW_TOKENS,
             "records": [], "label_s": 0.0, "processed": 0}
    if not path.is_file():
        return fresh
    cache = torch.load(path, map_location="cpu", weights_only=True)
    if (cache.get("format"), cache.get("fingerprint"), cache.get("max_new_tokens")) != (
        LABEL_FORMAT, fingerprint, MAX_NEW_TOKENS
    ):
        log(f"label cache {path} is for other weights or another recipe; relabelling from scratch")
        return fresh
    log(f"label cache {path}: resuming with {len(cache['records'])} labelled samples")
    return cache


def _save_cache(path: Path, cache: dict[str, Any]) -> None:
    """Atomic write, so an interrupted run never leaves a truncated cache behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(cache, tmp)
    os.replace(tmp, path)


def _label_batch(backend, samples, size: int, need_teacher: Callable[[bool], bool]) -> list[dict[str, Any]]:
    """Greedy answers, student inputs and (where ``need_teacher(correct)``) teacher relevance."""
    from vlmprune.backends.hf import Request
    from vlmprune.testbed import scenes

    requests = [Request(s.question, [scenes.render(s.scene, size)]) for s in samples]
    gens = backend.generate(requests, None, max_new_tokens=MAX_NEW_TOKENS)  # ratio 0: the stock model
    eos = backend.eos_ids()  # the backend's own stop rule, so "answer tokens" match generate()
    records = []
    for s, gen, (seq, images) in zip(samples, gens, backend.sequences(requests)):
        if len(images) != 1:
            raise ValueError(f"sample {s.index}: expected one image, got {len(images)}")
        output = gen.text.strip()
        correct = output == s.answer
        student = backend.explain_inputs(seq, images)[0].float().cpu()
        teacher = teacher_relevance(backend, seq, images[0], gen.token_ids, eos) if need_teacher(correct) else None
        records.append({"index": s.index, "family": s.family, "answer": s.answer, "output": output,
                        "correct": correct, "student": student, "teacher": teacher})
    return records


def label_samples(
    model_dir: Path,
    cache_path: Path,
    samples: int,
    only_correct: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    batch: int = 8,
    save_every_s: float = 60.0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Label train samples ``0..samples-1`` (reusing ``cache_path``) and return
    ``(records, stats)``; each record has ``student`` (N,) and ``teacher`` (N,) or None (teacher
    skipped for a wrong answer while ``only_correct``)."""
    from tqdm import tqdm

    from vlmprune.backends.hf import ReferenceBackend
    from vlmprune.testbed import scenes
    from vlmprune.testbed.registry import scene_layout

    cache = _load_cache(cache_path, model_fingerprint(model_dir), log)
    records: list[dict[str, Any]] = cache["records"]
    todo_missing = [i for i, r in enumerate(records[:samples]) if r["teacher"] is None and
                    (r["correct"] or not only_correct)]
    todo_new = list(range(len(records), samples))
    if not todo_missing and not todo_new:
        return records[:samples], {"label_s": cache["label_s"], "processed": cache["processed"], "new": 0}

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = ReferenceBackend.from_pretrained(model_dir, device=device)
    size, scale = scene_layout(backend.model.config)
    need = (lambda correct: correct or not only_correct)
    last_save = time.time()
    t0 = time.time()
    new = 0
    with tqdm(total=len(todo_missing) + len(todo_new), desc="explain labels", file=sys.stderr,
              disable=not progress) as bar:
        for start in range(0, len(todo_missing), batch):  # cached answers that now need a teacher
            idx = todo_missing[start : start + batch]
            t = time.time()
            fresh = _label_batch(backend, [scenes.sample("train", records[i]["index"], scale) for i in idx], size,
                                 lambda _c: True)
            for i, rec in zip(idx, fresh):
                records[i] = rec
            cache["label_s"] += time.time() - t
            cache["processed"] += len(idx)
            bar.update(len(idx))
        for start in range(0, len(todo_new), batch):
            idx = todo_new[start : start + batch]
            t = time.time()
            records += _label_batch(backend, [scenes.sample("train", i, scale) for i in idx], size, need)
            cache["label_s"] += time.time() - t
            cache["processed"] += len(idx)
            new += len(idx)
            bar.update(len(idx))
            kept = sum(r["teacher"] is not None for r in records)
            bar.set_postfix(correct=f"{sum(r['correct'] for r in records) / len(records):.2f}", kept=kept)
            if time.time() - last_save > save_every_s:
                _save_cache(cache_path, cache)
                last_save = time.time()
    _save_cache(cache_path, cache)
    log(f"labelled {len(todo_missing) + len(todo_new)} samples in {time.time() - t0:.1f} s")
    return records[:samples], {"label_s": cache["label_s"], "processed": cache["processed"], "new": new,
                               "device": device}


# --- student training ------------------------------------------------------------------------------


def _batches(xs: list[torch.Tensor], ys: list[torch.Tensor], order: list[int], size: int, pad: float = 0.0):
    """Right-padded (x, y, mask) batches; padding gets zero attention, target ``pad``, mask False."""
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        width = max(xs[i].numel() for i in idx)
        x = torch.zeros(len(idx), width)
        y = torch.full((len(idx), width), pad)
        mask = torch.zeros(len(idx), width, dtype=torch.bool)
        for row, i in enumerate(idx):
            n = xs[i].numel()
            x[row, :n], y[row, :n], mask[row, :n] = xs[i], ys[i], True
        yield x, y, mask


def topk_recall(scores: torch.Tensor, relevance: torch.Tensor, keep_fraction: float) -> float:
    """Share of the teacher's top ``keep_fraction`` tokens (by ``relevance``) that the top
    ``keep_fraction`` by ``scores`` also keeps: what pruning with ``scores`` retains of what the
    teacher says matters (chance = ``keep_fraction``)."""
    k = kept_count(relevance.numel(), 1.0 - keep_fraction)
    want = set(topk_sorted(relevance.float(), k).tolist())
    got = set(topk_sorted(scores.float(), k).tolist())
    return len(want & got) / max(k, 1)


def mass_recall(scores: torch.Tensor, relevance: torch.Tensor, keep_fraction: float) -> float:
    """Share of the teacher's (non-negative) relevance mass on the top ``keep_fraction`` tokens by
    ``scores``: recall weighted by how much the teacher says each token matters."""
    rel = relevance.float().clamp_min(0)
    total = float(rel.sum())
    if total <= 0:
        return keep_fraction
    got = topk_sorted(scores.float(), kept_count(rel.numel(), 1.0 - keep_fraction))
    return float(rel[got].sum()) / total


def _training_loss(loss: str, log_probs: torch.Tensor, y: torch.Tensor, generator=None) -> torch.Tensor:
    if loss == "pairwise":
        return pairwise_loss(log_probs, y, generator=generator)
    return kl_loss(log_probs, y)


def _labels(loss: str, relevance: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """What ``loss`` trains against, from one sample's teacher relevance (N,)."""
    if loss == "ranks":
        return rank_target(relevance)
    if loss == "pairwise":
        return rank_levels(relevance)
    return teacher_target(relevance, keep_fraction)


@torch.no_grad()
def evaluate_student(model: RelevanceCNN, xs, teachers, targets, batch_size: int, loss: str = "kl") -> dict[str, float]:
    """Mean validation loss, KL to the paper's label, and top-k recall / mass recall of the
    student vs the raw input attention at every :data:`RECALL_FRACTIONS` cut."""
    model.eval()
    gen = torch.Generator().manual_seed(0)  # the same pairs every epoch, so the loss is comparable
    loss_sum, kl_sum = 0.0, 0.0
    sums = {f"{what}{int(f * 100)}_{kind}": 0.0 for f in RECALL_FRACTIONS for what in ("top", "mass")
            for kind in ("recall", "recall_input_attention")}
    order = list(range(len(xs)))
    pad = -1.0 if loss == "pairwise" else 0.0
    paper = [teacher_target(t) for t in teachers]
    for start, (x, y, mask) in zip(range(0, len(order), batch_size), _batches(xs, targets, order, batch_size, pad)):
        log_probs = model(x, mask)
        loss_sum += float(_training_loss(loss, log_probs, y, gen)) * x.shape[0]
        idx = order[start : start + x.shape[0]]
        kl_sum += float(kl_loss(log_probs, next(_batches([xs[i] for i in idx], [paper[i] for i in idx],
                                                         list(range(len(idx))), len(idx)))[1])) * x.shape[0]
        for row, i in enumerate(idx):
            n = xs[i].numel()
            for frac in RECALL_FRACTIONS:
                pct = int(frac * 100)
                for what, fn in (("top", topk_recall), ("mass", mass_recall)):
                    sums[f"{what}{pct}_recall"] += fn(log_probs[row, :n], teachers[i], frac)
                    sums[f"{what}{pct}_recall_input_attention"] += fn(xs[i], teachers[i], frac)
    n = max(len(xs), 1)
    return {"loss": loss_sum / n, "kl": kl_sum / n, **{k: v / n for k, v in sums.items()}}


def train_student(
    train: list[tuple[torch.Tensor, torch.Tensor]],
    val: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: ExplainTrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[RelevanceCNN, dict[str, Any]]:
    """Fit a :class:`RelevanceCNN` on ``(student input, teacher R_v)`` pairs with ``cfg.loss``;
    returns the model with the lowest validation loss (the last one without a validation set) and
    the history."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    model = RelevanceCNN(RelevanceCNNConfig(channels=tuple(cfg.channels), grid=cfg.grid))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    xs = [x for x, _ in train]
    targets = [_labels(cfg.loss, r, cfg.keep_fraction) for _, r in train]
    vxs, vteach = [x for x, _ in val], [r for _, r in val]
    vtargets = [_labels(cfg.loss, r, cfg.keep_fraction) for r in vteach]
    pad = -1.0 if cfg.loss == "pairwise" else 0.0
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    history, best, best_kl, best_epoch = [], None, float("inf"), 0
    bar = tqdm(range(cfg.epochs), desc="explain cnn", file=sys.stderr, disable=not progress)
    for epoch in bar:
        model.train()
        order = list(range(len(xs)))
        rng.shuffle(order)
        total = 0.0
        for x, y, mask in _batches(xs, targets, order, cfg.batch_size, pad):
            loss = _training_loss(cfg.loss, model(x, mask), y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * x.shape[0]
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / len(xs)}
        if cfg.loss == "kl":
            entry["train_kl"] = entry["train_loss"]
        if val:
            metrics = evaluate_student(model, vxs, vteach, vtargets, cfg.batch_size, cfg.loss)
            entry.update({f"val_{k}": v for k, v in metrics.items()})
            if metrics["loss"] < best_kl:
                best_kl, best_epoch = metrics["loss"], epoch + 1
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            bar.set_postfix(train=f"{entry['train_loss']:.3f}", val=f"{metrics['loss']:.3f}",
                            top50=f"{metrics['top50_recall']:.3f}", top10=f"{metrics['top10_recall']:.3f}")
        else:
            bar.set_postfix(train=f"{entry['train_loss']:.3f}")
        history.append(entry)
    if best is not None:
        model.load_state_dict(best)
    else:
        best_epoch = cfg.epochs
    model.eval()
    log(f"explain cnn: best epoch {best_epoch}, train {cfg.loss} {history[best_epoch - 1]['train_loss']:.4f}"
        + (f", val {cfg.loss} {best_kl:.4f}" if val else ""))
    return model, {"history": history, "best_epoch": best_epoch}


# --- end to end ------------------------------------------------------------------------------------


def train_explain(
    model: str | Path,
    out: str | Path | None = None,
    cfg: ExplainTrainConfig = ExplainTrainConfig(),
    threads: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Label, train, save; returns the report (also written to ``<out stem>.json``).

    ``model``: a shipped name (``demo``) or a model folder. ``out`` defaults to
    ``<model folder>/vlmprune_explain_cnn.pt``, where the explain method looks by itself.
    """
    from vlmprune.testbed.registry import resolve_model

    cfg.validate()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    try:
        model_dir = resolve_model(model)
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    out = Path(out) if out is not None else model_dir / CHECKPOINT_NAME
    if out.is_dir():
        raise ValueError(f"--out must be a file path, {str(out)!r} is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    t_start = time.time()

    records, label_stats = label_samples(model_dir, labels_path(out), cfg.samples, cfg.only_correct,
                                         progress=progress, log=log)
    correct = sum(r["correct"] for r in records)
    used = [r for r in records if (r["correct"] or not cfg.only_correct) and r["teacher"] is not None]
    if not used:
        raise ValueError(
            f"--samples: none of the {len(records)} labelled samples was answered correctly; label more, "
            "or pass --keep-wrong (tests and smoke runs only)"
        )
    rng = random.Random(cfg.seed)
    order = list(range(len(used)))
    rng.shuffle(order)
    n_val = max(1, round(VAL_FRACTION * len(used))) if len(used) >= 2 else 0
    val = [(used[i]["student"], used[i]["teacher"]) for i in order[:n_val]]
    train = [(used[i]["student"], used[i]["teacher"]) for i in order[n_val:]]

    t = time.time()
    student, fit = train_student(train, val, cfg, progress=progress, log=log)
    train_s = time.time() - t
    student.save(out)

    last = fit["history"][fit["best_epoch"] - 1]
    processed = max(label_stats["processed"], 1)
    report = {
        "model": str(model),
        "model_dir": str(model_dir),
        "out": str(out),
        "labels": str(labels_path(out)),
        "config": asdict(cfg),
        "samples": len(records),
        "teacher_correct": correct,
        "teacher_accuracy": correct / len(records),
        "used": len(used),
        "train_samples": len(train),
        "val_samples": len(val),
        "tokens_per_sample": int(used[0]["student"].numel()),
        "best_epoch": fit["best_epoch"],
        "train_loss": last["train_loss"],
        "train_kl": last.get("train_kl"),
        "val": {k[4:]: v for k, v in last.items() if k.startswith("val_")} or None,
        "history": fit["history"],
        "timings": {
            "label_s": label_stats["label_s"],
            "label_s_per_sample": label_stats["label_s"] / processed,
            "train_s": train_s,
            "total_s": time.time() - t_start,
        },
        "threads": threads,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    log(f"saved the relevance CNN to {out}")
    return report


def patch_grid(model: str | Path) -> tuple[int, int]:
    """(rows, cols) of a single-view model's visual tokens, for the 2-D CNN (``--cnn grid``)."""
    from transformers import AutoConfig

    from vlmprune.testbed.registry import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(model))
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    if config.model_type != "llava":
        raise ValueError(f"--cnn grid needs a single-view LLaVA-1.5-style model, {model} is {config.model_type!r}")
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side, side


def run_cli(args) -> int:
    """``vlmprune train explain``: checks the arguments (ValueError names the flag), labels,
    trains, saves, prints one JSON line. Progress and logs go to stderr."""
    for flag, value in (("--steps", args.steps), ("--vit-steps", args.vit_steps), ("--work", args.work)):
        if value is not None:
            raise ValueError(f"{flag} applies to `vlmprune train demo` only")
    if args.explain_model is None:
        raise ValueError("--model is required: a shipped model name (demo) or a model folder")
    defaults = ExplainTrainConfig()
    try:
        channels = defaults.channels if args.cnn_channels is None else tuple(int(c) for c in args.cnn_channels.split(","))
    except ValueError:
        raise ValueError(f"--cnn-channels must be comma-separated ints, got {args.cnn_channels!r}") from None
    cfg = ExplainTrainConfig(
        samples=defaults.samples if args.samples is None else args.samples,
        epochs=defaults.epochs if args.epochs is None else args.epochs,
        batch_size=defaults.batch_size if args.batch_size is None else args.batch_size,
        seed=args.seed,
        only_correct=not args.keep_wrong,
        channels=channels,
        grid=patch_grid(args.explain_model) if args.cnn == "grid" else None,
        loss=getattr(args, "loss", None) or defaults.loss,
    )
    report = train_explain(
        args.explain_model, args.out, cfg, threads=args.threads, progress=not args.no_progress,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    val = report["val"] or {}
    print(json.dumps({
        "model": report["model"], "out": report["out"], "samples": report["samples"],
        "teacher_accuracy": report["teacher_accuracy"], "used": report["used"],
        "loss": report["config"]["loss"], "train_loss": report["train_loss"],
        "train_kl": report["train_kl"], "val_kl": val.get("kl"), "val_top50_recall": val.get("top50_recall"),
        "val_top50_recall_input_attention": val.get("top50_recall_input_attention"),
        "val_top10_recall": val.get("top10_recall"),
        "val_top10_recall_input_attention": val.get("top10_recall_input_attention"),
        "label_s_per_sample": report["timings"]["label_s_per_sample"],
    }))
    return 0
