"""Attention supervision of the testbed's LM stage: which keys each answer should attend to, and the losses.

Without it the small LM sat on the answer prior in every CPU-sized run. The scene generator knows
each answer's evidence, so up to three hops are supervised (:func:`grounding_loss`: the question's
naming words, then the named object's patches, then, for position questions, their order), plus a
read-out of the asked objects' coordinates (:func:`coordinate_loss`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlmprune.testbed import scenes


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
